"""How much of the pretrained network trains, and at what learning rate."""
