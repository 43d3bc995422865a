# The GIL hand-over the compiled loops share (cimported by _*.pyx; inline, nothing is built from this file).
#
# A long loop in C never lets another thread take the GIL by itself: a request's answer (or the next request)
# would wait until the whole loop is done instead of at most the switch interval. The loops call yield_gil
# every YIELD_EVERY records or changes (~0.3 ms of work).

cdef enum:
    YIELD_EVERY = 512


cdef inline void _nothing() noexcept nogil:
    pass


cdef inline void yield_gil() noexcept:
    # Released and taken again: a thread that asked for the GIL gets it in between.
    with nogil:
        _nothing()
