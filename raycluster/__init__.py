"""Ray executors of fisher's stages and the ``fisher`` command line.

One module per stage; each only distributes functions from :mod:`fisher`.
"""
