"""xmedjax: explainable medical-image classification in JAX."""

from xmedjax import host_memory as _host_memory

# First thing, before any JAX backend exists: freed host memory stays in the process, so
# XLA:CPU does not fault a step's buffers in anew each step (see xmedjax/host_memory.py).
_host_memory.keep_freed_memory()
# ... and, with XMEDJAX_HOST_MALLOC=huge-pages, that heap advised transparent huge pages.
_host_memory.advise_huge_pages()
