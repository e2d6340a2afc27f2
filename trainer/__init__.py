"""Arguments, process groups, data, pipeline schedule, optimizer and the training loop."""
