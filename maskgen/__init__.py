"""maskgen: masked copies of face images (2D thin-plate and 3D face-mesh mask rendering) for training."""
