"""Perception: medical-image I/O, vertebra segmentation and labelling, CBCT-to-CT registration."""
