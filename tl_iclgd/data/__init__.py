"""Task data written for tl_iclgd (no dataset downloads): see :mod:`tl_iclgd.data.reviews`."""
