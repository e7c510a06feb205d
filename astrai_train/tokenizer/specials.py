"""Special tokens and the default chat template of astrai tokenizers.

The names follow the conventions the big open models use (GPT/Qwen ChatML, Llama-3 BOS), so a
tokenizer trained here reads naturally next to theirs and HF tooling recognises the roles.
"""
from __future__ import annotations

EOS_TOKEN = "<|endoftext|>"  # ends a document; the separator between packed pretraining documents
BOS_TOKEN = "<|begin_of_text|>"  # optional document start (encode() never adds it on its own)
PAD_TOKEN = "<|pad|>"  # fills batches; never trained on
IM_START = "<|im_start|>"  # opens a chat turn: <|im_start|>{role}\n
IM_END = "<|im_end|>"  # closes a chat turn; the token an assistant must learn to emit

# In id order: a freshly trained tokenizer gives these ids 0..4, before the 256 byte tokens.
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, BOS_TOKEN, PAD_TOKEN, IM_START, IM_END)

# Tokens that close one assistant turn, most specific first. The first one in a vocabulary is the
# end-of-turn token that encode_chat puts in the loss mask; the model's eos is used when none is.
END_OF_TURN_TOKENS: tuple[str, ...] = (IM_END, "<|eot_id|>")

# Tokens that also end generation when present (besides the configured eos): a model trained on
# packed documents emits the document end, a chat model emits the end of turn.
STOP_TOKENS: tuple[str, ...] = (IM_END, EOS_TOKEN, "<|eot_id|>", "<|end_of_text|>")

# ChatML, the format Qwen and many others use. The trailing newline after <|im_end|> is template
# text (not trained on); the generation prompt opens the assistant turn the model must complete.
# Tools render as Qwen2.5 / Hermes do: their JSON signatures in the system turn, an assistant's
# calls as `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`, tool results as
# `<tool_response>` blocks in a user turn. Without tools, tool calls and tool messages the text is
# plain ChatML, byte for byte what this template rendered before it knew tools.
DEFAULT_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first and tools %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""

# Roles a chat message may have. "tool" carries a tool's result back (OpenAI's role "tool"); how
# it reads is the template's business (the default one wraps it in <tool_response>).
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
