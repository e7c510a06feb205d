"""What both sides of the gRPC contract agree on beyond the .proto's messages: the trailing
metadata keys that carry an error's offending field and OpenAI-style code, and the message size
limit both ends set on their channels."""
from __future__ import annotations

ERROR_PARAM_KEY = "astrai-error-param"  # trailing metadata: the request field an error names
ERROR_CODE_KEY = "astrai-error-code"    # trailing metadata: an OpenAI-style error code
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # above the facade's 4 MiB body limit, so HTTP sees 413 first
