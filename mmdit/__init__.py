"""mmdit: SD3-class MM-DiT training and sampling."""
