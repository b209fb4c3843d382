"""The language model: attention, the Transformer blocks and stack (dense or MoE FFNs),
scanning and remat, parameter and FLOP counts. Builds on moejax.moe."""
