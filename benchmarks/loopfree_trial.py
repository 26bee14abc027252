import sys, time, torch, json
sys.path.insert(0, "/work/main")
from lwlib.models import load_model, end_token_ids
from lwlib.data import load_ruler
from lwlib.text import repetition_report
from transformers import LogitsProcessor, LogitsProcessorList
torch.set_num_threads(1)
m, tok = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
ends = end_token_ids(tok)
class WinPen(LogitsProcessor):
    def __init__(s, p, w, plen): s.p, s.w, s.plen = p, w, plen
    def __call__(s, ids, scores):
        gen = ids[:, s.plen:]
        if s.w: gen = gen[:, -s.w:]
        if gen.shape[1] == 0: return scores
        sc = torch.gather(scores, 1, gen)
        sc = torch.where(sc > 0, sc / s.p, sc * s.p)
        out = scores.scatter(1, gen, sc)
        out[:, ends] = scores[:, ends]
        return out
items = [it for it in load_ruler("/work/shared/data") if it.lang == "en" and it.length in (2000, 5000)][:4]
tok.padding_side = "left"
for name, pen, win in [(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))]:
    torch.manual_seed(0)
    enc = [tok.apply_chat_template([{"role": "user", "content": it.prompt}], add_generation_prompt=True, tokenize=False) for it in items]
    b = tok(enc, return_tensors="pt", padding=True, add_special_tokens=False)
    lp = LogitsProcessorList([WinPen(pen, win, b.input_ids.shape[1])]) if pen != 1.0 else None
    t = time.time()
    out = m.generate(**b, max_new_tokens=int(sys.argv[4]), do_sample=True, temperature=0.5, top_k=0, top_p=1.0, eos_token_id=ends, pad_token_id=tok.pad_token_id, logits_processor=lp)
    for r in range(len(items)):
        toks = out[r, b.input_ids.shape[1]:].tolist()
        e = next((k for k, x in enumerate(toks) if x in ends), None)
        txt = tok.decode(toks[:e] if e is not None else toks, skip_special_tokens=True)
        rep = repetition_report(txt)
        print(json.dumps({"dec": name, "req": items[r].length, "stop": e is not None, "words": rep.words, "eff": rep.effective_words, "collapsed": rep.collapsed, "rate": round(rep.repeated_rate, 3), "tail": txt[-300:]}))
    print("secs", time.time() - t, flush=True)
