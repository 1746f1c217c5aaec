"""The Lightning callbacks of a training run, one per module: resumable checkpoints, throughput and MFU,
the console's progress bar and parameter summary, and the resolved config sent to the loggers."""
