"""Kernel side: the only package that talks to BCC and the BPF system calls."""
