"""`mertools plot`: pictures of a routing trace (`mertools run --trace-out`): the experts each layer chose over the
tokens, how often each was chosen, the expert cache's hits and misses, and the expert reads' latencies.

`read` loads a trace into typed arrays (numpy only); `figures` draws them (matplotlib, the `plot` extra); `cli` is
the click command.
"""
