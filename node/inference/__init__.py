"""Homomorphic-encrypted inference with TenSEAL CKKS.

The node encrypts each task input under its own CKKS key (:mod:`.keystore`, :mod:`.ckks`), the
model owner's service (:mod:`.service`) evaluates the task's network on the ciphertexts and
returns an encrypted logit, the node decrypts it (:mod:`.client`). The image, the logit and
the probability never leave the node in clear; the weights never reach it. Nothing here is
imported by the receive path (import-linter contract); TenSEAL, FastAPI and httpx are imported
where they are used.
"""
