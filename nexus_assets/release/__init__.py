"""Release: validation through the runtime and bundle building (above runtime/)."""
