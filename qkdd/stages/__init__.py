"""Pure, sans-IO post-processing stages. Each interactive stage is a pair of objects, one per role,
exchanging plain message dataclasses; none of them touches a socket, a file or a clock, and every random
draw comes from an injected :class:`qkdd.bits.RandomSource`."""
