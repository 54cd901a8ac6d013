"""What a run keeps between runs: the checkpoint, its key index, journals, answers and request
keys.
"""
