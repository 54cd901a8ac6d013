"""The Batch API driver: plan shards, submit, poll, collect (the cycle, its request lines, its
saved state).
"""
