"""astrai_serve: continuous-batching engine, paged KV cache, gRPC core and OpenAI REST facade."""
