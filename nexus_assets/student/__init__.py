"""The student: tower config, modules, router, quantization, save/load: all the runtime needs (above core/, probes/)."""
