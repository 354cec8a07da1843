"""Drop-in adapters exposing other influence libraries' APIs on top of tracin_func.

- :mod:`tracin_func.compat.captum`: ``TracInCP``, ``TracInCPFast`` and ``TracInCPFastRandProj`` with the
  constructor arguments and methods of captum 0.9.0, so that migrating is an import change. It does not import
  Captum.
"""
