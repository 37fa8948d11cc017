"""Names shared by the parts of the FLARE job, importable without torch, TenSEAL or FLARE (a relaying
site process and jobs without HE load none of them)."""

# -- meta keys of the messages between the server and the sites --
ERROR_KEY = "fedumm_error"  # meta key of a client that could not train this round
CODEC_META = "fedumm_codec"  # meta key: the codec of a compressed broadcast or upload (fedumm.fl.compress)
PACKED_META = "fedumm_packed"  # meta key: the params are one safetensors payload (see PACKED_KEY)
PACKED_KEY = "fedumm_payload"  # the one param of a packed message: the payload's bytes as uint8
HE_META = "fedumm_he"  # broadcast meta: "init" (plaintext W_0) or "delta" (the encrypted sum D_t)

# -- secure aggregation files --
CLIENT_CONTEXT = "client_context.tenseal"  # FLARE's ProvFileName.CLIENT_CONTEXT_TENSEAL
PLAIN_SUFFIX = "::plain"  # results files: a delta no client has trained yet, stored in the clear (zeros)

# -- the environment of a site process --
ENV_TRAINER_ADDRESS = "FEDUMM_TRAINER_ADDRESS"  # the shared trainer's socket; set: this site relays
ENV_TRAINER_KEY = "FEDUMM_TRAINER_KEY"  # hex authentication key of that socket
ENV_TRAINER_TIMEOUT = "FEDUMM_TRAINER_TIMEOUT"  # seconds a relay waits for the trainer to listen

# -- the shared trainer's socket (fedumm.engines.nvflare.trainer / relay) --
FORWARDED_META = ("fedumm_round", CODEC_META, HE_META, PACKED_META)  # broadcast meta a relay passes on
MAX_HEADER = 1 << 20  # bytes: a header is a few hundred; anything larger is not a peer of ours
