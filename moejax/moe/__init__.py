"""The MoE core: routers, dispatch engines, grouped matmuls, the expert FFN, expert
parallelism, and the MoE block that puts them together. Imports nothing above it but the
ground floor (errors, config, sharding)."""
