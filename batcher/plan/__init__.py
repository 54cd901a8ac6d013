"""What a job means, shared by every driver: the checks before a run, one row's path, the results
write.
"""
