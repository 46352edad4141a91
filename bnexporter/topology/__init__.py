"""What feeds and what follows each BatchNorm: graph sources translated into one IR."""
