"""Dynamo's standalone KV indexer, in kvgraph: the index sink's parts.

``lower_tier`` (CPU and disk copies), ``partition`` (one model's index with its tiers and
Dynamo's answers), ``registry`` (partitions and the engines they read), ``http_api`` (Dynamo
1.6.1's HTTP API on aiohttp).
"""
