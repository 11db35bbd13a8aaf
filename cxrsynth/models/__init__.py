"""Networks of the project, one module each (classifier, VQ-GAN, ...); each saves a self-describing folder."""
