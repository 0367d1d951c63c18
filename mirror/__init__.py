"""An air-gapped mirror and pull-through cache appliance for container images."""
