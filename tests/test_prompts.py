from lib import prompts


def test_course_prompt_is_verbatim():
    # the course mixes 人工智慧/人工智能 and has no space after ASSISTANT:
    assert prompts.build("X") == ("你是人工智慧助理，以下是用戶和人工智能助理之間的對話。"
                                  "你要對用戶的問題提供有用、安全、詳細和禮貌的回答。USER: X ASSISTANT:")


def test_zero_examples_is_zero_shot():
    for name in prompts.TEMPLATES:
        assert prompts.build("X", name, []) == prompts.template(name).format(instruction="X")


def test_examples_go_before_user():
    p = prompts.build("Q", "course", prompts.SEED_EXAMPLES[:2])
    head, tail = p.split("USER:")
    assert tail == " Q ASSISTANT:"
    assert prompts.FEWSHOT_INTRO in head
    for e in prompts.SEED_EXAMPLES[:2]:
        assert f"{e['instruction']} 答案：{e['output']}" in head


def test_seed_examples_verbatim():
    assert prompts.SEED_EXAMPLES[0]["instruction"].startswith("將“正月，甲子朔，蠶至")
    assert prompts.SEED_EXAMPLES[3] == {"instruction": "翻譯成現代文：\n士句請見，弗內。", "output": "士句請求進見，荀偃不接見。"}
