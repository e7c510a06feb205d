"""A conversation and a Qwen3-style chat template shared by the tokenizer tests."""

CONVERSATION = [
    {"role": "system", "content": "You are a terse bard."},
    {"role": "user", "content": "Speak of the moon."},
    {"role": "assistant", "content": "She waxes pale."},
    {"role": "user", "content": "用中文说 🌙"},
    {"role": "assistant", "content": "明月几时有 🌕"},
]

# A condensed Qwen3-style template: reasoning moved into <think> blocks, an empty think block on the
# final assistant turn, enable_thinking=False for the generation prompt, namespace() bookkeeping.
QWEN3_STYLE = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""
