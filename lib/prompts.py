"""Prompt templates (one place, selectable by name) and the few-shot prompt builder."""

# Verbatim from the course's utils.get_prompt: it mixes 人工智慧/人工智能 and puts no space after ASSISTANT:.
COURSE = "你是人工智慧助理，以下是用戶和人工智能助理之間的對話。你要對用戶的問題提供有用、安全、詳細和禮貌的回答。USER: {instruction} ASSISTANT:"

# The seed report's prompt_1: the course system text plus a description of the task.
INSTRUCTIVE = (
    "你是人工智慧助理，以下是用戶和人工智慧助理之間的對話。你要對用戶的問題提供有用、安全、詳細和禮貌的回答。"
    "接下來要做翻譯任務，請根據USER指令進行文言文及白話文的轉換，其中文言文是在中國古代語言模式，"
    "白話文又稱為現代文是現代的語言模式。USER: {instruction} ASSISTANT:"
)

TEMPLATES = {"course": COURSE, "instructive": INSTRUCTIVE}
CHAT = "chat"  # 02 only: the model's own chat template, the course's system text, the instruction as the user turn

# The seed's 4 hand-picked in-context examples, verbatim from its report (order as there).
SEED_EXAMPLES = [
    {"instruction": "將“正月，甲子朔，蠶至，太後享通天宮；赦天下，改元”翻譯成現代文。",
     "output": "聖曆元年正月，甲子朔，蠶至，太後在通天宮祭祀；大赦天下，更改年號。"},
    {"instruction": "將“雅裏惱怒地說： 從前在福山田獵時，你誣陷獵官，現在又說這種話。”翻譯成文言文。",
     "output": "雅裏怒曰： 昔畋於福山，卿誣獵官，今復有此言。"},
    {"instruction": "將下麵句子翻譯成文言文：令、錄、簿、尉等職官有年老病重的人允許彈劾。",
     "output": "令、錄、簿、尉諸職官有耄耋篤疾者舉劾之。"},
    {"instruction": "翻譯成現代文：\n士句請見，弗內。", "output": "士句請求進見，荀偃不接見。"},
]

# Shown before the examples (the seed: 請學習以下翻譯例子進行轉換).
FEWSHOT_INTRO = "請學習以下翻譯例子進行轉換"


def template(name: str) -> str:
    """The template text for a name in TEMPLATES; a clear error otherwise."""
    if name not in TEMPLATES:
        raise KeyError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def build(instruction: str, name: str = "course", examples=()) -> str:
    """The prompt for one query; k examples go before `USER:`, as in the seed's few-shot prompt.

    k=0 gives exactly the zero-shot prompt. Each example reads `{instruction} 答案：{output}`, as the seed
    wrote them, so the model sees the task's own phrasing followed by its answer.
    """
    text = template(name)
    if not examples:
        return text.format(instruction=instruction)
    head, tail = text.split("USER:", 1)
    shots = "".join(f"{e['instruction']} 答案：{e['output']}\n" for e in examples)
    return f"{head}{FEWSHOT_INTRO}\n{shots}USER:" + tail.format(instruction=instruction)


def chat(tok, instruction: str) -> str | None:
    """The course query in the model's own chat template, or None if its tokenizer has none.

    The metric adds BOS itself, so a BOS the template writes is taken off the front.
    """
    if not getattr(tok, "chat_template", None):
        return None
    system = COURSE.split("USER:")[0].strip()
    text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": instruction}],
                                   tokenize=False, add_generation_prompt=True)
    return text[len(tok.bos_token):] if tok.bos_token and text.startswith(tok.bos_token) else text
