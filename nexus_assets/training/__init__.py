"""Training: losses, tower data from the feature cache, the train loop (above student/)."""
