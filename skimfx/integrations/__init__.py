"""skimfx in front of and inside other serving engines.

- ``block_selection``: Quest over a paged KV cache whose blocks hold every head of a token (no engine
  needed; what the vLLM plugin runs).
- ``vllm``: the ``vllm.general_plugins`` entry point (``skimfx[vllm]``): vLLM's CPU attention backend with
  Quest sparse decode.
- ``compress``: prompt compression for any engine (``skimfx.compress_prompt``; ``skimfx compress``).

Nothing here imports vLLM until vLLM itself loads the plugin.
"""
