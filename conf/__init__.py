"""The configs, importable as the package `finetune.conf` (src/finetune/conf links here).

Hydra finds them as `pkg://finetune.conf` in a checkout and in an installed wheel alike; a Hydra
package config source needs this file to accept the folder. One copy: see README "Install as a library".
"""
