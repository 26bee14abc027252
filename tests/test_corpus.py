"""The human-written corpus (lwlib.corpus): the Gutenberg reader on messy hand-made and real text, unwrapping,
front matter, passage lengths and boundaries, instructions, book splits, the download path (loopback HTTP
server), the stage's reuse/refusal and the writer path (loopback chat server)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import math
import random
import re
import shutil
import threading
from pathlib import Path

import pytest

from lwlib import corpus as C
from lwlib.config import load_profile
from lwlib.corpus import (
    Book, CorpusConfig, Paragraph, build_corpus, cut_passages, download_books, heading_subject, instruction_for,
    load_corpus, load_manifest, long_texts_dir, paragraphs, read_book, round_length, salient_terms,
    split_books, split_long_paragraphs, strip_gutenberg,
)
from lwlib.instructions import required_length
from lwlib.nll import load_conversations
from lwlib.sft import load_sft_data
from lwlib.text import count_words


@pytest.fixture(scope="module")
def folder() -> Path:
    try:
        return long_texts_dir(download=False)
    except FileNotFoundError as e:
        pytest.skip(f"the 70 books are not on this machine (shared/data/long_texts or $LWLIB_LONG_TEXTS): {e}")


@pytest.fixture(scope="module")
def books(folder) -> dict[int, Book]:
    return {b.id: b for b in C._folder_books(folder)}


@functools.lru_cache(maxsize=None)
def _paras(folder: Path, book_id: int) -> tuple[Paragraph, ...]:
    b = {b.id: b for b in C._folder_books(folder)}[book_id]
    return tuple(paragraphs(strip_gutenberg(read_book(b, folder), b.filename), b.language))


# ----------------------------------------------------------------------------------------- reader
NEW = ("\ufeffThe Project Gutenberg EBook of Test, by Someone\r\n\r\nTitle: Test\r\n\r\n"
       "*** START OF THIS PROJECT GUTENBERG EBOOK TEST ***\r\n\r\nBody line one.\r\nBody line two.\r\n\r\n"
       "End of the Project Gutenberg EBook of Test, by Someone\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK TEST ***\r\n"
       "Section 1. General Terms of Use and Redistributing Project Gutenberg-tm electronic works\r\n")
NEWER = ("Title: Two\n\n***START OF THE PROJECT GUTENBERG EBOOK SPEECHES AND LETTERS OF ABRAHAM\nLINCOLN, 1832-1865***\n\n"
         "Fourscore.\n\n***END OF THE PROJECT GUTENBERG EBOOK SPEECHES***\nlicense text\n")
COMMA = "header\n*** Start of the Project Gutenberg EBook, RELATIVITY ***\nE = mc.\n*** end of the project gutenberg ebook, RELATIVITY ***\n"
OLD = ("The Project Gutenberg Etext of Sesame and Lilies, by John Ruskin\r\nWe need your donations.\r\n\r\n"
       "***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***\r\nWhy is this \"Small Print!\" statement here?\r\n"
       "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\r\n\r\nSesame and Lilies\r\n\r\nLECTURE I\r\n\r\n"
       "My first duty this evening.\r\n\r\nEnd of The Project Gutenberg Etext of Sesame and Lilies, by John Ruskin\r\n")
ZH_NO_END = "\n第一回　甄士隱夢幻識通靈　賈雨村風塵怀閨秀\n此開卷第一回也．\n　　說到辛酸處，荒唐愈可悲．\n"
ZH_END = "\n第一回　說楔子\n王冕道：好。\n\n\nEnd of the Project Gutenberg EBook of Ru Lin Wai Shi, by Jing Zi Wu\n"


def test_strip_gutenberg_header_formats():
    assert strip_gutenberg(NEW) == "Body line one.\nBody line two.\n"
    assert strip_gutenberg(NEWER) == "Fourscore.\n"  # the marker's title runs onto a second line
    assert strip_gutenberg(COMMA) == "E = mc.\n"  # new format with a comma, any case
    old = strip_gutenberg(OLD)
    assert old.startswith("Sesame and Lilies") and old.rstrip().endswith("My first duty this evening.")
    assert "Small Print" not in old and "donations" not in old
    assert strip_gutenberg(ZH_NO_END) == ZH_NO_END.strip("\n") + "\n"  # no markers at all: the whole text
    assert strip_gutenberg(ZH_END).rstrip().endswith("王冕道：好。")
    with pytest.raises(ValueError, match="empty.txt.*nothing is left"):
        strip_gutenberg("*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***",
                        source="empty.txt")


def test_strip_gutenberg_on_every_real_file(folder, books):
    for b in books.values():
        raw = read_book(b, folder)
        body = strip_gutenberg(raw, b.filename)
        assert "\r" not in body and count_words(body) > 0.9 * b.words, b.id
        for junk in ("*** START OF", "***START OF", "*** END OF", "***END OF", "General Terms of Use",
                     "End of the Project Gutenberg", "End of Project Gutenberg"):
            assert junk.lower() not in body.lower(), (b.id, junk)
        assert "SMALL PRINT" not in body and "Small Print!" not in body, b.id  # (24527 reads "Small print could be read")
    assert strip_gutenberg(read_book(books[24264], folder)).rstrip().endswith("休笑世人痴!")  # no end line
    assert strip_gutenberg(read_book(books[1293], folder)).lstrip().startswith("Sesame and Lilies")


# ------------------------------------------------------------------------------------- paragraphs
EN_MESSY = """\r
\r
Produced by Some Volunteer and the Online Distributed\r
Proofreading Team\r
\r
\r
                        A TEST BOOK\r
\r
                          _by_\r
\r
                       Jane Writer\r
\r
[Illustration: The author at her desk,\r
    in a long caption]\r
\r
CONTENTS\r
\r
   I. THE FIRST DAY\r
  II. THE SECOND DAY\r
\r
\r
CHAPTER I\r
\r
THE FIRST DAY\r
\r
It was a cold morning when Mary Smith left the house. She walked\r
down the lane[1] and met Mr. Brown, who was _very_ kind, and a double-\r
belled door stood open.\r
\r
    Roses are red,\r
      violets are blue.\r
\r
[Footnote 1: The lane is\r
\r
now a road [see map].]\r
\r
=== Page 2 ===========================================\r
\r
\r
* * * * *\r
\r
CHAPTER II\r
\r
THE SECOND DAY\r
\r
Mary Smith came back the next day and Mr. Brown said nothing at all about\r
it; he only\r
\r
=== Page 3 ===========================================\r
\r
smiled at Mary Smith and Mr. Brown went home.\r
\r
THE END\r
"""


def test_paragraphs_unwrap_and_clean_hand_made():
    ps = paragraphs(EN_MESSY, "en")
    assert [(p.heading, p.text) for p in ps] == [
        (True, "CHAPTER I\nTHE FIRST DAY"),
        (False, "It was a cold morning when Mary Smith left the house. She walked down the lane and met Mr. Brown, "
                "who was very kind, and a double-belled door stood open."),
        (False, "Roses are red,\nviolets are blue."),
        (True, "CHAPTER II\nTHE SECOND DAY"),
        (False, "Mary Smith came back the next day and Mr. Brown said nothing at all about it; he only smiled at "
                "Mary Smith and Mr. Brown went home."),
    ]
    assert all(p.words == count_words(p.text) for p in ps)


ZH_MESSY = """
第一回　說楔子敷陳大義　借名流隱括全文
-----------------------------------------------------------------
　　話說王冕在秦家放牛，每到黃昏，回家跟著母
親歇宿。王冕道：“娘說的是
。”當夜商議定了。 王冕自此在秦家放牛。

    詩曰：
第二回　王孝廉村學識同科　周蒙師暮年登上第話說山東兗州府
汶上縣有個鄉村。
"""


def test_paragraphs_chinese_layout():
    ps = paragraphs(ZH_MESSY, "zh")
    assert [(p.heading, p.text) for p in ps] == [
        (True, "第一回\u3000說楔子敷陳大義\u3000借名流隱括全文"),
        (False, "話說王冕在秦家放牛，每到黃昏，回家跟著母親歇宿。王冕道：“娘說的是。”當夜商議定了。"),
        (False, "王冕自此在秦家放牛。"),  # a space after a sentence end inside a line starts a paragraph
        (False, "詩曰："),
        (True, "第二回\u3000王孝廉村學識同科\u3000周蒙師暮年登上第"),  # the couplet's halves are equal
        (False, "話說山東兗州府汶上縣有個鄉村。"),  # text glued to the title starts the next paragraph
    ]


@pytest.mark.parametrize("book_id, first_heading, first_text", [
    (36, "BOOK ONE", "No one would have believed in the last years of the nineteenth century"),
    (2701, "ETYMOLOGY.", "(Supplied by a Late Consumptive Usher to a Grammar School.)"),
    (98, "Book the First--Recalled to Life", "It was the best of times, it was the worst of times"),
    (1015, "CHAPTER I\nTHE FRONTIER", "Last spring, 1846, was a busy season"),
    (345, "CHAPTER I\nJONATHAN HARKER'S JOURNAL", "(Kept in shorthand.)"),
    (1342, "Chapter 1", "It is a truth universally acknowledged"),
    (23950, "第一回\u3000宴桃園豪傑三結義\u3000斬黃巾英雄首立功", "詞曰："),
])
def test_front_matter_and_contents_dropped_on_real_books(folder, book_id, first_heading, first_text):
    ps = _paras(folder, book_id)
    assert ps[0].heading and ps[0].text.startswith(first_heading)
    assert not ps[1].heading and ps[1].text.startswith(first_text)
    # the table of contents is gone: every chapter heading occurs once, no "Contents" line is left
    labels = [line for p in ps if p.heading for line in p.text.split("\n")
              if re.match(r"(?:chapter|book|letter)\s+[\w-]+|第.{1,5}回", line, re.I)]
    assert labels and len(labels) == len(set(labels))
    assert not any(re.fullmatch(r"(table of )?contents\.?", line.strip(), re.I) for p in ps for line in p.text.split("\n"))


SAMPLE = [36, 132, 147, 345, 1228, 1293, 1468, 2701, 9097, 14474, 16643, 22114, 29635, 24032]


def test_markers_and_edition_notes_gone(folder, books):
    _check_markers(folder, [books[i] for i in SAMPLE])


@pytest.mark.slow
def test_markers_and_edition_notes_gone_on_every_real_book(folder, books):
    _check_markers(folder, books.values())


def _check_markers(folder, books):
    for b in books:
        text = "\n".join(p.text for p in _paras(folder, b.id))
        for junk in ("[Illustration", "[Footnote", "Project Gutenberg", "Transcriber's Note", "=== Page", "\r"):
            assert junk.lower() not in text.lower(), (b.id, junk)
        assert not re.search(r"(?m)^Produced by", text), b.id
        assert not re.search(r"\[\d{1,3}\]|\{\d{1,3}\}", text), b.id
        assert sum(p.heading for p in _paras(folder, b.id)) >= 1, b.id


# -------------------------------------------------------------------------------------- passages
def _check_aligned(units, passages, lo, hi):
    end = 0
    for p in passages:
        assert p.start >= end and p.end > p.start  # non-overlapping, in order
        assert p.text == "\n\n".join(u.text for u in units[p.start:p.end])  # whole paragraphs only
        assert not units[p.start].heading and not units[p.end - 1].heading
        assert lo <= p.words == count_words(p.text) <= hi
        end = p.end


def test_passages_follow_the_log_uniform_spread_and_end_on_paragraphs(folder, books):
    lo, hi = 100, 6000
    ids = [2701, 1400, 3069, 9334, 944, 158, 24264]
    logs = []
    for bid in ids:
        b = books[bid]
        units = split_long_paragraphs(_paras(folder, bid), hi, b.language)
        for seed in range(3):
            ps = cut_passages(_paras(folder, bid), random.Random(seed), lo, hi, bid, b.language)
            _check_aligned(units, ps, lo, hi)
            logs += [(math.log(p.words) - math.log(lo)) / (math.log(hi) - math.log(lo)) for p in ps]
    logs.sort()
    assert len(logs) > 800
    for q in (0.25, 0.5, 0.75):  # log-uniform: the q-quantile of the normalized log-length is q
        assert abs(logs[int(q * len(logs))] - q) < 0.07, (q, logs[int(q * len(logs))])


def test_cut_passages_is_deterministic_and_configurable(folder, books):
    paras = _paras(folder, 1342)
    a = cut_passages(paras, random.Random(5), 100, 6000, 1342)
    assert [(p.start, p.end) for p in a] == [(p.start, p.end) for p in cut_passages(paras, random.Random(5), 100, 6000, 1342)]
    assert [(p.start, p.end) for p in a] != [(p.start, p.end) for p in cut_passages(paras, random.Random(6), 100, 6000, 1342)]
    small = cut_passages(paras, 1, 300, 800, 1342)
    assert small and all(300 <= p.words <= 800 for p in small)
    with pytest.raises(ValueError, match="min_words < max_words"):
        cut_passages(paras, 0, 500, 500)


def test_long_paragraphs_split_at_sentence_ends():
    sent = "The cat sat on the mat and looked at the rain. "
    p = Paragraph((sent * 30).strip())  # 330 words
    pieces = split_long_paragraphs([Paragraph("Intro.", heading=True), p], 100, "en")
    assert pieces[0].heading and all(q.words <= 100 for q in pieces[1:]) and len(pieces) == 5
    assert " ".join(q.text for q in pieces[1:]) == p.text and all(q.text.endswith(".") for q in pieces[1:])
    zh = Paragraph("王冕看書。" * 40)  # 160 words
    zpieces = split_long_paragraphs([zh], 50, "zh")
    assert "".join(q.text for q in zpieces) == zh.text and all(q.words <= 50 for q in zpieces)
    units = split_long_paragraphs([Paragraph("Short one here. " * 3), p], 100, "en")
    ps = cut_passages([Paragraph("Short one here. " * 3), p], 0, 20, 100)
    _check_aligned(units, ps, 20, 100)


# ---------------------------------------------------------------------------------- instructions
def test_round_length_and_heading_subject():
    assert [round_length(w) for w in (4, 104, 296, 312, 1024, 1990, 2049, 5960)] == [10, 100, 300, 300, 1000, 2000, 2000, 6000]
    assert heading_subject("CHAPTER I\nTHE FRONTIER", "en") == "The Frontier"
    assert heading_subject("BOOK ONE\nTHE COMING OF THE MARTIANS\nI.\nTHE EVE OF THE WAR.", "en") == "The Eve of the War"
    assert heading_subject("Chapter 12", "en") is None
    assert heading_subject("FEDERALIST No. 1\nGeneral Introduction\nHAMILTON", "en") == "General Introduction"
    assert heading_subject("第一回　宴桃園豪傑三結義　斬黃巾英雄首立功", "zh") == "宴桃園豪傑三結義，斬黃巾英雄首立功"


def test_salient_terms():
    en = ("Mr. Bingley came in. The room was full, and Elizabeth watched Mr. Bingley dance with Jane Bennet. "
          "Then Jane Bennet smiled. The music went on; Elizabeth sighed, and Elizabeth left. Through the door "
          "came Mr. Darcy, and through the window the rain.")
    # by count (Elizabeth 3, Bingley 2 after "Mr.", Jane Bennet 2); not "Then", "The", "Through" or Darcy (once)
    assert salient_terms(en, "en") == ["Elizabeth", "Bingley", "Jane Bennet"]
    zh = "王冕道：「娘說的是。」秦老道：「好。」王冕道：「是。」秦老道：「去罷。」王冕看書，王冕畫荷花。"
    assert salient_terms(zh, "zh")[:2] == ["王冕", "秦老"]


def test_instructions_state_the_rounded_length_in_the_passage_language(folder, books):
    n = 0
    for bid in (36, 852, 14314, 3076, 16623, 12769, 5001, 24264, 23950):
        b = books[bid]
        for p in cut_passages(_paras(folder, bid), random.Random(0), 100, 6000, bid, b.language)[:25]:
            ins = instruction_for(p, b, p.words, random.Random(p.id), b.language)
            want = round_length(p.words)
            assert required_length(ins) == want, ins
            if b.language == "en":
                assert re.search(rf"\b{want:,}\s+words|\b{want}\s+words", ins) and not re.search(r"[\u4e00-\u9fff]", ins)
            else:
                assert re.search(rf"{want}字", ins) and re.search(r"[\u4e00-\u9fff]{10}", ins)
            subject = heading_subject(p.heading, b.language)
            if subject:
                assert subject in ins
            assert C._clean_title(b.title) in ins
            n += 1
    assert n > 150
    # several phrasings per type and language
    b, p = books[36], cut_passages(_paras(folder, 36), 0, 100, 6000, 36)[3]
    assert len({instruction_for(p, b, p.words, random.Random(k), "en") for k in range(40)}) >= 4


# ---------------------------------------------------------------------------------------- splits
def test_split_books_whole_books_both_languages(books):
    bs = list(books.values())
    s = split_books(bs, 4, 4, seed=0)
    ids = [{b.id for b in s[k]} for k in ("train", "nll", "eval")]
    assert len(ids[1]) == 4 and len(ids[2]) == 4 and sum(map(len, ids)) == len(bs)
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert {b.language for b in s["nll"]} == {"en", "zh"} and {b.language for b in s["eval"]} == {"en", "zh"}
    assert [b.id for b in split_books(bs, 4, 4, seed=0)["nll"]] == [b.id for b in s["nll"]]
    assert any([b.id for b in split_books(bs, 4, 4, seed=k)["nll"]] != [b.id for b in s["nll"]] for k in range(1, 5))
    en_only = [b for b in bs if b.language == "en"]
    assert {b.language for b in split_books(en_only, 4, 4, 0)["nll"]} == {"en"}
    with pytest.raises(ValueError, match="leaves no training book"):
        split_books(bs[:5], 3, 2, 0)


# -------------------------------------------------------------------------------------- download
FAKE_TEXT = ("*** START OF THE PROJECT GUTENBERG EBOOK CAFÉ ***\n\nCHAPTER I\n\n"
             + "\n\n".join(f"Paragraph {k} of the café book, with enough words to count as a passage here." for k in range(40))
             + "\n\n*** END OF THE PROJECT GUTENBERG EBOOK CAFÉ ***\n")


def _fake_book(sha: str, bid: int = 990001) -> Book:
    return Book(id=bid, title="Café Days", author="A. Writer", language="en", genre="Literature and Creative Writing",
                form="novel", source_repo="GITenberg/Cafe-Days_990001", source_path=f"{bid}.txt",
                source_commit="0" * 40, sha256=sha, bytes=len(FAKE_TEXT.encode()), words=500,
                source_encoding="latin-1", license="public domain")


@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "www"
    src = root / "GITenberg/Cafe-Days_990001" / ("0" * 40)
    src.mkdir(parents=True)
    (src / "990001.txt").write_bytes(FAKE_TEXT.encode("latin-1"))  # served as latin-1, like 5001
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_checks_sha256_and_reencodes(http_root, tmp_path, monkeypatch):
    good = _fake_book(hashlib.sha256(FAKE_TEXT.encode("utf-8")).hexdigest())
    monkeypatch.setattr(C, "BASE_URL", http_root)
    dest = download_books([good], tmp_path / "books")
    assert (dest / "990001.txt").read_text(encoding="utf-8") == FAKE_TEXT
    assert load_manifest(dest / "manifest.jsonl") == [good]
    bad = _fake_book("ab" * 32, bid=990001)
    with pytest.raises(ValueError) as e:
        download_books([bad], tmp_path / "bad")
    msg = str(e.value)
    assert "990001" in msg and http_root + "GITenberg/Cafe-Days_990001/" in msg and "ab" * 32 in msg
    assert hashlib.sha256(FAKE_TEXT.encode()).hexdigest() in msg
    assert not (tmp_path / "bad" / "990001.txt").exists() and not list((tmp_path / "bad").glob("*.part"))
    with pytest.raises(FileNotFoundError, match="could not download book 990001"):
        download_books([dataclasses.replace(good, source_path="missing.txt")], tmp_path / "none")


def test_long_texts_dir_search_order_and_download(http_root, tmp_path, monkeypatch):
    good = _fake_book(hashlib.sha256(FAKE_TEXT.encode("utf-8")).hexdigest())
    man = tmp_path / "fake_manifest.jsonl"
    man.write_text(json.dumps(dataclasses.asdict(good)) + "\n", encoding="utf-8")
    monkeypatch.setattr(C, "BASE_URL", http_root)
    monkeypatch.delenv("LWLIB_LONG_TEXTS", raising=False)
    monkeypatch.delenv("LWLIB_DATA_DIR", raising=False)
    monkeypatch.setenv("LWLIB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="LWLIB_LONG_TEXTS"):
        long_texts_dir(download=False, manifest=man)
    got = long_texts_dir(manifest=man)  # no folder has it: downloaded into the cache
    assert got == tmp_path / "cache" / "data" / "long_texts" and (got / "990001.txt").exists()
    assert long_texts_dir(download=False, manifest=man) == got  # found in the cache next time
    own = tmp_path / "mine"
    own.mkdir()
    shutil.copy(got / "990001.txt", own)
    shutil.copy(man, own / "manifest.jsonl")
    monkeypatch.setenv("LWLIB_LONG_TEXTS", str(own))
    assert long_texts_dir(download=False, manifest=man) == own  # $LWLIB_LONG_TEXTS comes first
    assert long_texts_dir(own) == own
    (own / "990001.txt").unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 book file"):
        long_texts_dir(own)


# ----------------------------------------------------------------------------------------- stage
SMALL = [147, 22114, 29635, 27005, 5001, 535, 24032]  # the shortest books, one Chinese


@pytest.fixture()
def small_folder(folder, tmp_path) -> Path:
    d = tmp_path / "books"
    d.mkdir()
    lines = [l for l in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
             if l.strip() and json.loads(l)["id"] in SMALL]
    (d / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for bid in SMALL:
        shutil.copy(folder / f"{bid}.txt", d)
    return d


def test_build_corpus_outputs_splits_reuse_and_refusal(small_folder, tmp_path):
    prof = load_profile("smoke", run_root=tmp_path / "runs")
    cfg = CorpusConfig(path=str(small_folder), nll_books=2, eval_books=1, nll_max_passages=20)
    stats = build_corpus(prof, cfg)
    out = prof.run_dir / "corpus"
    assert not stats["reused"] and (out / "manifest.json").exists() and (out / "stats.json").exists()
    recs = {s: load_corpus(prof, s) for s in ("train", "nll", "eval")}
    assert [len(load_sft_data(out / f)) for f in C.SPLITS.values()] == [len(recs[s]) for s in ("train", "nll", "eval")]
    assert len(load_conversations(out / "heldout_nll.jsonl")) == len(recs["nll"]) == 20
    split_ids = {s: {r["book_id"] for r in rs} for s, rs in recs.items()}
    assert len(split_ids["nll"]) == 2 and len(split_ids["eval"]) == 1
    assert not (split_ids["train"] & split_ids["nll"] or split_ids["train"] & split_ids["eval"]
                or split_ids["nll"] & split_ids["eval"])
    assert "zh" in {r["lang"] for r in recs["nll"]}  # both languages in the NLL set
    r = recs["train"][0]
    assert r["source"] == C.SOURCE and r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant"
    for k in ("id", "book_id", "title", "author", "lang", "type", "form", "words", "required_length"):
        assert k in r
    for rs in recs.values():
        for r in rs:
            assert r["words"] == count_words(r["messages"][1]["content"]) and 100 <= r["words"] <= 6000
            assert r["required_length"] == round_length(r["words"]) == required_length(r["messages"][0]["content"])
    # no held-out book's text leaks into the train data
    held = "\n".join(p.text for bid in split_ids["nll"] | split_ids["eval"] for p in _paras(small_folder, bid))
    assert not any(r["messages"][1]["content"][:300] in held for r in recs["train"])
    assert stats["splits"]["train"]["passages"] == len(recs["train"]) and stats["seconds"] > 0
    assert set(stats["splits"]["nll"]["by_lang"]) == {"en", "zh"}
    # same config: reused; another config: refused, naming the change; overwrite: rebuilt
    again = build_corpus(prof, dataclasses.replace(cfg))
    assert again["reused"] and load_corpus(prof, "train") == recs["train"]
    with pytest.raises(ValueError, match=r"max_words: 6000 -> 3000.*corpus.overwrite: true"):
        build_corpus(prof, dataclasses.replace(cfg, max_words=3000))
    capped = build_corpus(prof, dataclasses.replace(cfg, max_words=3000, max_passages=30, overwrite=True))
    train = load_corpus(prof, "train")
    assert not capped["reused"] and len(train) == 30 and max(r["words"] for r in train) <= 3000
    assert max(r["words"] for r in train) > 3 * min(r["words"] for r in train)  # the cap keeps the spread
    with pytest.raises(FileNotFoundError, match="build the corpus first"):
        load_corpus(load_profile("smoke", run_root=tmp_path / "empty"), "train")


def test_build_corpus_is_deterministic(small_folder, tmp_path):
    cfg = CorpusConfig(path=str(small_folder), languages=["en"], nll_books=1, eval_books=1)
    a = [load_profile("smoke", run_root=tmp_path / x) for x in ("a", "b")]
    for p in a:
        build_corpus(p, cfg)
    assert (a[0].run_dir / "corpus/longwriter.jsonl").read_bytes() == (a[1].run_dir / "corpus/longwriter.jsonl").read_bytes()
    assert {r["lang"] for r in load_corpus(a[0], "train")} == {"en"}


def test_corpus_config_validation():
    with pytest.raises(ValueError, match="languages"):
        CorpusConfig(languages=["fr"])
    with pytest.raises(ValueError, match="min_words < max_words"):
        CorpusConfig(min_words=500, max_words=400)
    with pytest.raises(ValueError, match="max_passages"):
        CorpusConfig(max_passages=0)
    cfg = CorpusConfig(writer={"kind": "openai", "base_url": "http://127.0.0.1:1/v1"})
    assert cfg.writer.kind == "openai"
    with pytest.raises(ValueError, match="corpus.writer.*unknown"):
        CorpusConfig(writer={"kindd": "openai"})


def test_writer_prompt_states_the_length_and_elides_long_passages():
    text = "\n\n".join(["word " * 100] * 30 + ["The very end."])
    p = C.writer_prompt(text, 3000, "en", max_words=1000)
    assert "3000 words" in p and "[...]" in p and p.rstrip().endswith("The very end.") and count_words(p) < 1100
    zh = C.writer_prompt("王冕看書。" * 20, 100, "zh")
    assert "字数要求为100字" in zh and zh.endswith("王冕看書。" * 20)
    assert C._clean_writer_output("Instruction: Write a story.", 1200, "en") == "Write a story. (Length: 1,200 words.)"
    assert C._clean_writer_output("写一篇约1200字的故事。", 1200, "zh") == "写一篇约1200字的故事。"


def test_writer_backtranslates_and_caches(chat_server, tmp_path):
    body = "\n\n".join(
        f"On day {k} Martha walked to the mill by the river, and Martha spoke with the miller about the price of "
        f"flour, the weather and the state of the road to the town." for k in range(14))
    text = f"*** START OF THE PROJECT GUTENBERG EBOOK MILL ***\n\nCHAPTER I\n\nTHE MILL\n\n{body}\n\n*** END OF THE PROJECT GUTENBERG EBOOK MILL ***\n"
    d = tmp_path / "books"
    d.mkdir()
    (d / "990002.txt").write_text(text, encoding="utf-8")
    book = dataclasses.replace(_fake_book(hashlib.sha256(text.encode()).hexdigest(), 990002), source_encoding="utf-8")
    (d / "manifest.jsonl").write_text(json.dumps(dataclasses.asdict(book)) + "\n", encoding="utf-8")
    prof = load_profile("smoke", run_root=tmp_path / "runs")
    writer = {"kind": "openai", "model": chat_server.model, "base_url": chat_server.url, "max_retries": 0,
              "extra": {"max_new_tokens": 4, "temperature": 0, "max_passage_words": 40}}
    cfg = CorpusConfig(path=str(d), languages=["en"], min_words=100, max_words=200, nll_books=0, eval_books=0,
                       writer=writer)
    before = chat_server.requests
    stats = build_corpus(prof, cfg)
    recs = load_corpus(prof, "train")
    assert stats["instruction_source"] == "writer" and len(recs) >= 2
    assert chat_server.requests - before == len(recs)
    cache = {r["id"]: r for r in map(json.loads, (prof.run_dir / "corpus/writer_instructions.jsonl").read_text().splitlines())}
    for r in recs:
        ins = r["messages"][0]["content"]
        assert r["instruction_source"] == "writer" and cache[r["id"]]["instruction"] == ins
        assert required_length(ins) == r["required_length"]  # stated (appended when the writer left it out)
    build_corpus(prof, dataclasses.replace(cfg, overwrite=True))  # rebuilt from the cache: no new request
    assert chat_server.requests - before == len(recs)


def test_a_built_corpus_is_reused_where_the_books_are_absent(small_folder, tmp_path, monkeypatch):
    """A GPU machine gets the built corpus but not the books: the stage reuses it, checked against the manifest."""
    monkeypatch.setattr(C, "BUNDLED_MANIFEST", small_folder / "manifest.jsonl")
    monkeypatch.setenv("LWLIB_LONG_TEXTS", str(small_folder))
    prof = load_profile("smoke", run_root=tmp_path / "runs")
    cfg = CorpusConfig(languages=["en"], nll_books=1, eval_books=1, nll_max_passages=5)
    first = build_corpus(prof, cfg)
    monkeypatch.setenv("LWLIB_LONG_TEXTS", str(tmp_path / "nowhere"))

    def no_books(*a, **k):
        raise AssertionError("a finished corpus must not need the books")

    monkeypatch.setattr(C, "long_texts_dir", no_books)
    again = build_corpus(prof, cfg)
    assert again["reused"] and again["splits"] == first["splits"]
    with pytest.raises(AssertionError, match="must not need the books"):  # another config: a rebuild needs them
        build_corpus(prof, dataclasses.replace(cfg, max_words=3000, overwrite=True))


def test_cut_text_keeps_the_text_in_pieces_of_at_most_the_cap(folder, books):
    paras = list(_paras(folder, 1342))[40:140]  # Pride and Prejudice, a stretch of dialogue and narration
    text = "\n\n".join(p.text for p in paras if not p.heading)
    total = count_words(text)
    for cap in (120, 500, 2000):
        pieces = C.cut_text(text, cap, "en")
        assert all(count_words(p) <= cap for p in pieces)
        assert "\n\n".join(pieces).split() == text.split()  # the same words in the same order, nothing lost
        assert total / len(pieces) >= 0.6 * cap  # pieces near the cap: close to the fewest that fit
    assert C.cut_text(text, total, "en") == [text]
    zh = "\n\n".join(p.text for p in list(_paras(folder, 23863))[20:60])
    assert all(count_words(p) <= 300 for p in C.cut_text(zh, 300, "zh"))
    with pytest.raises(ValueError, match="max_words must be >= 1"):
        C.cut_text(text, 0, "en")


def test_cut_records_hold_the_same_text_with_their_own_instructions(small_folder, tmp_path):
    prof = load_profile("smoke", run_root=tmp_path / "runs")
    build_corpus(prof, CorpusConfig(path=str(small_folder), min_words=100, max_words=3000, nll_books=1,
                                    eval_books=1, nll_max_passages=4))
    recs = load_corpus(prof, "train")
    for cap in (200, 1000):
        cut = C.cut_records(recs, cap)
        assert max(r["words"] for r in cut) <= cap and len(cut) > len(recs)
        assert sum(r["words"] for r in cut) == sum(r["words"] for r in recs)  # the same text, only cut
        by = {}
        for r in cut:
            by.setdefault(r.get("cut_from", r["id"]), []).append(r)
            assert r["required_length"] == round_length(r["words"]) == required_length(r["messages"][0]["content"])
        for r in recs:  # each record's pieces, in order, are its passage
            assert "\n\n".join(p["messages"][1]["content"] for p in by[r["id"]]).split() == \
                r["messages"][1]["content"].split()
        assert cut == C.cut_records(recs, cap)  # deterministic
    with pytest.raises(ValueError, match="not a corpus passage"):
        C.cut_records([{"id": "x", "messages": recs[0]["messages"]}], 100)


def test_nll_books_get_their_own_length_range(small_folder, tmp_path):
    prof = load_profile("smoke", run_root=tmp_path / "runs")
    build_corpus(prof, CorpusConfig(path=str(small_folder), nll_books=2, eval_books=1, nll_max_passages=8,
                                    nll_min_words=1500, nll_max_words=2000))
    assert all(1500 <= r["words"] <= 2000 for r in load_corpus(prof, "nll"))
    assert min(r["words"] for r in load_corpus(prof, "train")) < 1500
    with pytest.raises(ValueError, match="nll_min_words < nll_max_words"):
        CorpusConfig(nll_min_words=3000, nll_max_words=2000)
