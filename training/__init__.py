"""Training for caesar-gpt: `python -m training` turns a corpus into a checkpoint directory
(gpt/checkpoint.py's format), the one thing training and the service share."""
