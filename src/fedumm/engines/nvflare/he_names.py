"""Names shared by the HE parts of the FLARE job (no TenSEAL import, so jobs without HE need none)."""

HE_META = "fedumm_he"  # broadcast meta: "init" (plaintext W_0) or "delta" (the encrypted sum D_t)
CLIENT_CONTEXT = "client_context.tenseal"  # FLARE's ProvFileName.CLIENT_CONTEXT_TENSEAL
PLAIN_SUFFIX = "::plain"  # results files: a delta no client has trained yet, stored in the clear (zeros)
