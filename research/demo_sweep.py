"""The sweep behind the demo's model (benchmarks/demo/RESULTS.md; issue 4).

Trains a CLIP variant on a generated data world for a fixed number of steps with every image
decoded once into memory (no loader, no augmentation), then scores it: zero-shot accuracy on the
test split with the world's ensemble prompts (colour, shape, size, position, count), text->image
recall on 1,000 test captions, and linear probes (logistic regression on 4,000 training images'
features) for shape, position and size. One JSON line per run goes to --out.

This is a research harness, kept so the results page's tables can be re-run; the product path is
`clipforge demo`. Its variants (model surgery, NegCLIP negatives, grouped batches, per-tower learning
rates) live here, not in the package; each step is the trainer's (clipforge.train.step.TrainStep:
clear, backward, clip, optimizer step) around the variant's own loss. Variants (each reproduces a
results row, 400 steps of 128):

  python research/demo_sweep.py --world demo_out/world --model tiny-conv            # 4 blocks, transformer
  python research/demo_sweep.py --world demo_out/world --model tiny-conv --tlayers 2 --tpool mean
  python research/demo_sweep.py --world demo_out/world --model tiny-bow --vlayers 4 [--seed 1] [--neg 1]
  python research/demo_sweep.py --world demo_out/world --model tiny-bow            # the demo's model
  python research/demo_sweep.py --world demo_out/world --model tiny-conv --tlayers 2 --tpool mean \
      [--group colour --gsize 16 | --group ident --gsize 8 --gfrac 0.5 | --neg 1 | --siglip 1 | --tlr 0.3 |
       --force_pos 1 | --canon 1 | --single_steps 400]
  python research/demo_sweep.py --world demo_out/world --model tiny-conv --supervised shape   # the ceiling

Rows of 2026-12-03 (bf16 autocast, as the demo now trains on CPUs with native bf16):

  python research/demo_sweep.py --world demo_out/world --model tiny-bow --bf16 1 [--steps 800 --warmup 80] \
      [--lr 4e-3 | --bs 64 | --tlr 3 | --stem1 16 | --multicap 5]

Held-out colour-shape pairs (RESULTS.md, "Why black hexagons lag"; 1,500 steps, lr 3e-3):

  python research/demo_sweep.py --world demo_out/world --model tiny-bow --bf16 1 --steps 1500 --warmup 150 \
      --lr 3e-3 [--gray 0.2 | --neg 1]
  python research/demo_sweep.py --world demo_out/world --model tiny-bow --bf16 1 --steps 2800 --warmup 100 \
      --lr 2e-3 [--seed 1 | --seed 2 | --wd 0.3 [--seed 1] | --lr 3e-3 | --stemnorm gn --seed 0/1/2 | --vpool mean]  # spread
  python research/demo_sweep.py --world demo_out/world --model tiny-bow --supervised shape --steps 1500 --warmup 100 \
      [--stemact relu]

The |x| first stage (RESULTS.md, "What closed most of the held-out gap"; tiny-bow now has it built in:
without --stemact a model keeps its own first activation, --stemact relu gives tiny-bow's old ReLU stem):

  python research/demo_sweep.py --world demo_out/world --model tiny-bow --bf16 1 --steps 2800 --warmup 100 \
      --lr 2e-3 --seed 0/1/2 [--stemact relu | --stemact absmix]

The token table updated at its batch's rows only (RESULTS.md, "Half the compute"):

  python research/demo_sweep.py --world demo_out/world --model tiny-bow --bf16 1 --steps 1500 --warmup 100 \
      --lr 2e-3 --threads 1 [--sparse 1]

At the one-core demo's length (RESULTS.md, "At the one-core demo's length"):

  python research/demo_sweep.py --world demo_out/world --model tiny-bow --bf16 1 --sparse 1 --threads 1 \
      --steps 1800 --warmup 100 --lr 2e-3 --seed 0/1 [--tdrop 0.25 | --ema 0.998 | --graycap 0.15/0.25/0.5 \
      | --graycap 0.25 --graykeep black,white | --group colour [--gfrac 0.5] | --lr 3e-3
      | --tdrop 0.25 --group colour --gfrac 0.5 | --tdrop 0.25 --lr 3e-3]

Why the held-out pairs fail (RESULTS.md, same length; --save keeps the model for
research/demo_heldout_diag.py):

  python research/demo_sweep.py --world demo_out/world --model tiny-bow --bf16 1 --sparse 1 --threads 1 \
      --steps 1800 --warmup 100 --lr 2e-3 --seed 0/1/2 [--scale_init 100 | --hnnce 0.5 | --swapneg 9
      | --swapneg 9 --lr 3e-3 [--tlr 0.6667] | --swapneg 9 --scale_init 100 | --tdrop 0.25] [--save DIR]
  (--swapcls and --c1 exist for runs not made yet: swaps of some word classes only; the first conv's channels)

Every attribute word swapped, the stem's first convolution, colour-blind first filters (RESULTS.md, "Every
attribute word swapped"; tiny-bow now opens with a 5x5 convolution, and --k1 K puts a plain KxK one in its
place: --k1 3 gives the earlier stem; --lumhalf 16, tried and not kept, makes half its filters colour-blind):

  python research/demo_sweep.py --world demo_out/world --model tiny-bow --bf16 1 --sparse 1 --threads 1 \
      --steps 1800 --warmup 100 --lr 2e-3 --scale_init 100 --seed 0/1/2/3 [--swapneg 9 --k1 3 | --swapneg 64
      --swapall 1 --k1 3 | --swapneg 9 --k1 5 | --swapneg 64 --swapall 1 --k1 5 [--lumhalf 16]] [--save DIR]

--tpool mean swaps in a mean-pooled text forward for models built with end-token pooling (the
library's TextConfig.pool='mean' does the same); --neg 1 adds NegCLIP-style negative captions (one
colour/shape/size/position/count word swapped) as extra columns of the image->text softmax;
--group builds batches from groups sharing the first object's colour ('colour') or colour+shape
('ident'). The world must hold the default 20,000 training pairs for --ntrain 20000.
"""
import argparse, json, math, os, time, csv, sys
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
import clipforge
from clipforge.train.loss import ContrastiveLoss
from clipforge.train.step import TrainStep
from clipforge.model.registry import get_config
from clipforge.model.vision import AbsActivation
from dataclasses import replace

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1,3,1,1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1,3,1,1)

def load(split, n=None):
    rows = list(csv.DictReader(open(f'{W}/{split}.csv')))[:n]
    cache = f'{CACHE}/{split}_{len(rows)}.pt'
    try:
        x = torch.load(cache)
    except FileNotFoundError:
        x = torch.from_numpy(np.stack([np.asarray(Image.open(f'{W}/'+r['image']).convert('RGB')) for r in rows])).permute(0,3,1,2).contiguous()
        torch.save(x, cache)
    return rows, x

def prep(x):
    return (x.float()/255 - MEAN)/STD

LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

def augment(x, gen, pick=None):
    """--gray: a random fraction of the batch turned to luminance (three equal channels); ``pick``:
    these rows instead (--graycap)."""
    x = prep(x)
    if a.gray or pick is not None:
        pick = torch.rand(len(x), generator=gen) < a.gray if pick is None else pick
        if pick.any():
            raw = x[pick] * STD + MEAN
            x[pick] = (((raw * LUMA).sum(1, keepdim=True)).expand(-1, 3, -1, -1) - MEAN) / STD
    return x

def heldout_shape_scores(predict_names):
    """Shape accuracy on the single-object test_heldout images, overall and per held-out
    (colour, shape) pair. ``predict_names`` maps a normalised image batch to shape names."""
    rows_, X_ = load('test_heldout')
    keep = [i for i, r in enumerate(rows_) if r['shape']]  # the shape column is set for single objects only
    names = [n for k in range(0, len(keep), 500) for n in predict_names(prep(X_[keep[k:k + 500]]))]
    right = torch.tensor([n == rows_[i]['shape'] for n, i in zip(names, keep)])
    pairs = [(rows_[i]['colour'], rows_[i]['shape']) for i in keep]
    out = {'heldout_shape': round(right.float().mean().item() * 100, 1)}
    for pair in sorted(set(pairs)):
        sel = torch.tensor([q == pair for q in pairs])
        out['heldout_' + '_'.join(pair)] = round(right[sel].float().mean().item() * 100, 1)
    return out

def shape_stem(visual):
    """The conv-stem variants (--stem1, --stemnorm, --stemact), applied in place to an image tower."""
    if not isinstance(visual.conv1, nn.Sequential):  # a patch embedding, not a conv stem
        if a.stem1 or a.stemnorm != 'bn' or a.stemact:
            sys.exit('--stem1/--stemnorm/--stemact need a model with a conv stem (tiny-conv, tiny-bow)')
        return
    if a.stem1:
        old = visual.conv1
        first = old[0]
        old[0] = nn.Conv2d(a.stem1, first.out_channels, 3, stride=2, padding=1, bias=False)
        visual.conv1 = nn.Sequential(nn.Conv2d(3, a.stem1, 3, padding=1, bias=False), nn.BatchNorm2d(a.stem1), nn.ReLU(inplace=True), *old)
    if a.k1 or a.c1:  # the first stride-2 conv: kernel size, channels (the second conv takes them)
        st = visual.conv1
        k1, c1 = a.k1 or st[0].kernel_size[0], a.c1 or st[0].out_channels
        st[0] = nn.Conv2d(3, c1, k1, stride=2, padding=(k1 - 1) // 2, bias=False)
        st[1] = nn.BatchNorm2d(c1)
        st[3] = nn.Conv2d(c1, st[3].out_channels, 3, stride=2, padding=1, bias=False)
    if a.lumhalf:  # the first conv's first N filters colour-blind: one weight shared by R, G and B
        import torch.nn.utils.parametrize as P_
        class _Blind(nn.Module):
            def forward(self, w):
                return torch.cat([w[:a.lumhalf].mean(1, keepdim=True).expand(-1, w.shape[1], -1, -1), w[a.lumhalf:]])
        P_.register_parametrization(visual.conv1[0], 'weight', _Blind())
    stem = visual.conv1
    if a.stemnorm == 'gn':  # per-image normalisation in the conv stem instead of batch statistics
        for k, m_ in enumerate(stem):
            if isinstance(m_, nn.BatchNorm2d):
                stem[k] = nn.GroupNorm(1, m_.num_features)
    if not a.stemact:  # the model's own first activation (tiny-bow: |x|, tiny-conv: ReLU)
        return
    k = next(k for k, m_ in enumerate(stem) if isinstance(m_, (nn.ReLU, AbsActivation)))
    if a.stemact == 'relu':
        stem[k] = nn.ReLU(inplace=True)
    elif a.stemact == 'absmix':  # half the first conv's channels |x| then BatchNorm (exactly sign-blind), half BatchNorm + ReLU
        stem[k - 1] = AbsMix(stem[k - 1].num_features); stem[k] = nn.Identity()
    else:
        stem[k] = AbsActivation()

class AbsMix(nn.Module):
    def __init__(self, c):
        super().__init__(); self.h = c // 2
        self.bn_abs, self.bn_relu = nn.BatchNorm2d(self.h), nn.BatchNorm2d(c - self.h)
    def forward(self, x):
        return torch.cat([self.bn_abs(x[:, :self.h].abs()), F.relu(self.bn_relu(x[:, self.h:]))], 1)

def supervised(a) -> int:
    """The image tower alone, trained with cross-entropy on one label column of the
    single-object images: how fast the tower *can* learn the attribute."""
    torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
    rows, X = load('train', a.ntrain); trows, TX = load('test')
    keep = [i for i, r in enumerate(rows) if r[a.supervised]]
    cls = sorted({rows[i][a.supervised] for i in keep})
    Y = torch.tensor([cls.index(rows[i][a.supervised]) for i in keep]); X = X[keep]
    tk = [i for i, r in enumerate(trows) if r[a.supervised]]
    TY = torch.tensor([cls.index(trows[i][a.supervised]) for i in tk]); TX = TX[tk]
    cfg = get_config(a.model)
    visual = clipforge.create_model(cfg, seed=a.seed).visual
    shape_stem(visual)
    net = nn.Sequential(visual, nn.Linear(cfg.embed_dim, len(cls)))
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.wd, betas=(0.9, 0.98))
    train_step = TrainStep(net, opt, grad_clip=0.0)  # no clipping in this baseline
    g = torch.Generator().manual_seed(a.seed); t0 = time.time()
    for s in range(a.steps):
        for gr in opt.param_groups:
            gr['lr'] = a.lr * min(1, (s + 1) / a.warmup) * 0.5 * (1 + math.cos(math.pi * s / a.steps))
        idx = torch.randint(len(Y), (a.bs,), generator=g)
        loss = train_step.minimise(lambda: F.cross_entropy(net(prep(X[idx])), Y[idx])).loss
        if s % 100 == 0:
            print(f'{a.name} step {s} loss {loss:.3f} {time.time() - t0:.0f}s', flush=True)
    net.eval()
    with torch.no_grad():
        acc = torch.cat([net(prep(TX[i:i + 500])).argmax(-1) for i in range(0, len(TX), 500)]).eq(TY).float().mean()
    res = {'name': a.name, 'supervised': a.supervised, 'model': a.model, 'steps': a.steps,
           'accuracy': round(acc.item() * 100, 1), 'train_s': round(time.time() - t0)}
    if a.supervised == 'shape':  # the same tower on the held-out colour-shape pairs
        with torch.no_grad():
            res.update(heldout_shape_scores(lambda x: [cls[j] for j in net(x).argmax(-1).tolist()]))
    print(json.dumps(res), flush=True)
    open(a.out, 'a').write(json.dumps(res) + '\n')
    return 0


p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--world', required=True, help='a generated data world (clipforge data synth, or demo_out/world)')
p.add_argument('--cache', default='.sweep_cache', help='where decoded image tensors are kept between runs')
p.add_argument('--out', default='sweep_results.jsonl', help='one JSON line per run is appended here')
p.add_argument('--supervised', default=None, help='instead: train the image tower on this label column (shape, position, ...)')
p.add_argument('--name', default='base'); p.add_argument('--model', default='tiny')
p.add_argument('--steps', type=int, default=400); p.add_argument('--bs', type=int, default=128)
p.add_argument('--lr', type=float, default=2e-3); p.add_argument('--wd', type=float, default=0.1)
p.add_argument('--warmup', type=int, default=40)
p.add_argument('--threads', type=int, default=2); p.add_argument('--ntrain', type=int, default=20000)
p.add_argument('--scale_init', type=float, default=None)
p.add_argument('--hnnce', type=float, default=0.0, help='HN-NCE hard-negative weighting with this beta (0: the plain CLIP loss)')
p.add_argument('--swapneg', type=int, default=0, help='K: each image also against its caption with one attribute word swapped for each other class of its kind (up to K)')
p.add_argument('--swapall', type=int, default=0, help='--swapneg: swaps of every attribute word of the caption at once (up to K), not of one drawn at random')
p.add_argument('--swapcls', default='0,1,2,3,4', help='--swapneg: the word classes swapped (0 colour, 1 shape, 2 size, 3 position, 4 count)')
p.add_argument('--lumhalf', type=int, default=0, help="the stem's first N filters see luminance only (weights shared across R, G, B)")
p.add_argument('--k1', type=int, default=0, help="the conv stem's first convolution: kernel size (stride 2) [3]")
p.add_argument('--c1', type=int, default=0, help="the conv stem's first convolution: output channels [32]")
p.add_argument('--save', default=None, help='write the trained model here (clipforge format)')
p.add_argument('--tpool', default='eot'); p.add_argument('--force_pos', type=float, default=0); p.add_argument('--canon', type=int, default=0); p.add_argument('--tlr', type=float, default=1.0); p.add_argument('--siglip', type=int, default=0); p.add_argument('--neg', type=int, default=0); p.add_argument('--seed', type=int, default=0); p.add_argument('--single_steps', type=int, default=0); p.add_argument('--group', default='none'); p.add_argument('--gsize', type=int, default=8); p.add_argument('--gfrac', type=float, default=1.0)
p.add_argument('--vlayers', type=int, default=None); p.add_argument('--patch', type=int, default=None)
p.add_argument('--multicap', type=int, default=0, help='K captions per training image, one per epoch in turn (regenerated from the scene)')
p.add_argument('--stem1', type=int, default=0, help='prepend a stride-1 3x3 conv with this many channels to the conv stem')
p.add_argument('--stemnorm', default='bn', choices=['bn', 'gn'], help="the conv stem's norm: BatchNorm or GroupNorm(1) (per image)")
p.add_argument('--stemact', default=None, choices=['relu', 'abs1', 'absmix'], help="the conv stem's first activation: ReLU, |x|, or half |x| before BatchNorm + half ReLU [the model's own]")
p.add_argument('--vpool', default='cls', choices=['cls', 'mean'], help='image embedding: class token or mean of patch tokens')
p.add_argument('--gray', type=float, default=0.0, help='random grayscale: this fraction of training images (per sample), captions unchanged')
p.add_argument('--graycap', type=float, default=0.0, help='this fraction of training images turned to luminance, their captions without colour words')
p.add_argument('--graykeep', default='', help='--graycap: colour words kept in grey images\' captions (comma-separated: black,white stay true in grey)')
p.add_argument('--sparse', type=int, default=0, help='update the token table at its batch rows only (lazy Adam)')
p.add_argument('--bf16', type=int, default=0, help='bf16 autocast for the forward pass (CPU with avx512_bf16/AMX)')
p.add_argument('--tlayers', type=int, default=None); p.add_argument('--vwidth', type=int, default=None)
p.add_argument('--tdrop', type=float, default=0.0, help="caption word dropout: each word token left out of a training caption with this chance")
p.add_argument('--ema', type=float, default=0.0, help='score an exponential moving average of the weights with this decay (0: the weights)')
a = p.parse_args()
W, CACHE = a.world, a.cache
os.makedirs(CACHE, exist_ok=True)
if a.supervised:
    sys.exit(supervised(a))
torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
cfg = get_config(a.model)
if a.vlayers or a.patch or a.vwidth:
    cfg = replace(cfg, vision=replace(cfg.vision, layers=a.vlayers or cfg.vision.layers, patch_size=a.patch or cfg.vision.patch_size, width=a.vwidth or cfg.vision.width))
if a.tlayers: cfg = replace(cfg, text=replace(cfg.text, layers=a.tlayers))
if a.siglip: cfg = replace(cfg, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
model = clipforge.create_model(cfg, seed=a.seed)
shape_stem(model.visual)
if a.vpool == 'mean':  # the image embedding from the mean of the patch tokens instead of the class token
    _full = model.visual.transformer.forward  # every position through every block, then the mean
    model.visual.transformer.forward = lambda x, causal=False, rows=None: _full(x, causal)[:, 1:].mean(1)
if a.scale_init is not None:
    with torch.no_grad(): model.logit_scale.fill_(math.log(a.scale_init))
if a.tpool == 'mean':
    import types
    tt = model.transformer if hasattr(model, 'transformer') else model.text
    def fwd(self, tokens, project=True):
        from clipforge.model.text import eot_positions
        pos = eot_positions(tokens, self.cfg.eot_token_id)
        tokens = tokens[:, : int(pos.max()) + 1]
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        if a.tlayers != 99: x = self.transformer(x, causal=True)
        mask = (torch.arange(n)[None, :] <= pos[:, None]).float().unsqueeze(-1)
        x = (x * mask).sum(1) / mask.sum(1)
        x = self.ln_final(x)
        return x @ self.text_projection if project else x
    tt.forward = types.MethodType(fwd, tt)
tok = clipforge.tokenizer_for(model)
rows, X = load('train', a.ntrain)
import re as _re
_rng = np.random.default_rng(1)
def _cap(r):
    c = r['caption']
    if a.canon and r['count'] == '1':
        return f"{r['size']} {r['colour']} {r['shape']} {r['position']}"
    if r['count'] == '1' and not _re.search(r'\b(top|bottom|left|right|center|centre|middle|upper|lower)\b', c.lower()) and _rng.random() < a.force_pos:
        c = c.rstrip('.') + ' in the ' + r['position']
    return c
T = tok([_cap(r) for r in rows])
if a.multicap:
    import json as _json
    from clipforge.data.synth import world as _W
    from clipforge.data.synth.captions import caption as _caption
    _world = _W.World(_W.SynthConfig(**{k: v for k, v in _json.load(open(f'{W}/world.json'))['config'].items() if k in _W.SynthConfig.__dataclass_fields__}))
    _scenes = [_world.scene('train', i) for i in range(len(rows))]
    assert all(_caption(sc, _W.split_rng(_world.config.seed, 'train', i, 1)) == rows[i]['caption'] for i, sc in enumerate(_scenes[:50]))
    TK = [T] + [tok([_caption(sc, _W.split_rng(_world.config.seed, 'train', i, 100 + k)) for i, sc in enumerate(_scenes)]) for k in range(1, a.multicap)]
    print('multicap', a.multicap, flush=True)
epoch_ = 0
if a.neg or a.swapneg:
    from clipforge.data.synth.captions import SHAPE_WORDS, SIZE_WORDS, plural
    from clipforge.data.synth.world import COLOURS
    cats = []
    cats.append({c: [o for o in COLOURS if o != c] for c in COLOURS})
    sw = {}
    for sh, ws in SHAPE_WORDS.items():
        for w_ in ws:
            sw[w_] = [x for o, xs in SHAPE_WORDS.items() if o != sh for x in xs]
            sw[plural(w_)] = [plural(x) for o, xs in SHAPE_WORDS.items() if o != sh for x in xs]
    cats.append(sw)
    zw = {}
    for sz, ws in SIZE_WORDS.items():
        for w_ in ws: zw[w_] = [x for o, xs in SIZE_WORDS.items() if o != sz for x in xs]
    cats.append(zw)
    cats.append({'left': ['right'], 'right': ['left'], 'top': ['bottom'], 'bottom': ['top'], 'upper': ['lower'], 'lower': ['upper'],
                 'above': ['below'], 'below': ['above'], 'beneath': ['above'], 'under': ['above'],
                 'center': ['left', 'right', 'top', 'bottom'], 'centre': ['left', 'right', 'top', 'bottom'], 'middle': ['left', 'right', 'top', 'bottom']})
    cats.append({'one': ['two', 'three'], 'two': ['one', 'three'], 'three': ['one', 'two'], '1': ['2', '3'], '2': ['1', '3'], '3': ['1', '2']})
    nrng = np.random.default_rng(2)
    def negate(c):
        # Longest-first matches so 'plus sign' / 'crescent moon' swap whole.
        cands = []
        for ci, cat in enumerate(cats):
            for w_ in sorted(cat, key=len, reverse=True):
                for m in _re.finditer(r'(?<![\w-])' + _re.escape(w_) + r'(?![\w-])', c, flags=_re.I):
                    cands.append((ci, m.start(), m.end(), w_))
        if not cands: return None
        ci, s0, e0, w_ = cands[nrng.integers(len(cands))]
        opts = cats[ci][w_]
        return c[:s0] + opts[nrng.integers(len(opts))] + c[e0:]
    caps_ = [_cap(r) for r in rows]
if a.swapneg:  # every caption's attribute words, each with one swap per other class of its kind
    def swaps(c):
        groups, taken = [], []
        for ci, cat in enumerate(cats):
            if str(ci) not in a.swapcls.split(','): continue
            for w_ in sorted(cat, key=len, reverse=True):
                for m in _re.finditer(r'(?<![\w-])' + _re.escape(w_) + r'(?![\w-])', c, flags=_re.I):
                    if any(m.start() < e and s_ < m.end() for s_, e in taken): continue
                    taken.append((m.start(), m.end()))
                    alts = list(dict.fromkeys(cats[ci][w_]))
                    if ci == 1:  # shapes: one word per other shape class
                        keep = {}
                        for x in alts:
                            cls = next(o for o, xs in SHAPE_WORDS.items() if x in xs or x in [plural(y) for y in xs])
                            keep.setdefault(cls, []).append(x)
                        alts = [v[nrng.integers(len(v))] for v in keep.values()]
                    groups.append([c[:m.start()] + x + c[m.end():] for x in alts])
        return groups
    SG, flat = [], []
    for c in caps_:
        gs = []
        for g_ in swaps(c):
            gs.append((len(flat), len(g_))); flat.extend(g_)
        SG.append(gs)
    SWT = tok(flat)
    print('swap negatives', len(flat), 'captions with none', sum(not g_ for g_ in SG), flat[:4], flush=True)
if a.neg:
    negs = [negate(c) for c in caps_]
    print('neg coverage', sum(n is not None for n in negs) / len(negs), negs[:5], flush=True)
    HASNEG = torch.tensor([n is not None for n in negs])
    TN = tok([n if n is not None else c for n, c in zip(negs, caps_)])
groups_ = []
for n, p_ in model.named_parameters():
    wd_ = a.wd if (p_.ndim >= 2 and 'embedding' not in n) else 0.0
    lr_ = a.lr * (a.tlr if n.startswith('text.') else 1.0)
    groups_.append({'params': [p_], 'weight_decay': wd_, 'lr': lr_, 'base': lr_})
if a.sparse:  # the token table at its batch's rows only (OptimConfig.sparse_embeddings)
    from clipforge.train.sparse_rows import RowAdamW, sparse_tables
    sparse_tables(model)
opt = (RowAdamW if a.sparse else torch.optim.AdamW)(groups_, lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
train_step = TrainStep(model, opt, grad_clip=1.0)
lossf = ContrastiveLoss(kind='siglip' if a.siglip else 'clip')
if a.hnnce:  # HN-NCE (Radenovic et al. 2023): negatives reweighted by exp(beta * logit), mean weight 1
    def lossf(imf, txf, scale, bias=None):
        logits = scale * imf.float() @ txf.float().T
        n = logits.shape[0]; eye = torch.eye(n, dtype=torch.bool)
        def one(l):
            b = (a.hnnce * l.detach()).masked_fill(eye, -float('inf'))
            logw = math.log(n - 1) + b - torch.logsumexp(b, 1, keepdim=True)
            return F.cross_entropy(l + logw.masked_fill(eye, 0.0), torch.arange(n))
        return 0.5 * (one(logits) + one(logits.T))
SINGLE = torch.tensor([i for i, r in enumerate(rows) if r['count'] == '1'])
if a.group != 'none':
    if True:
        def key(r):
            o = json.loads(r['objects'])[0]
            return o['colour'] if a.group == 'colour' else (o['colour'], o['shape']) if a.group == 'ident' else (o['colour'], o['shape'], r['count'])
        names = {}
        keys = [names.setdefault(key(r), len(names)) for r in rows]
    groups = {}
    for i, k_ in enumerate(keys): groups.setdefault(int(k_), []).append(i)
    glist = [torch.tensor(v) for v in groups.values() if len(v) >= 2]
    print('groups', len(glist), 'sizes', sorted(len(v) for v in glist)[::max(1,len(glist)//8)], flush=True)
    def grouped_batch():
        n_grouped = int(a.bs * a.gfrac) // a.gsize * a.gsize
        out = []
        for gi in torch.randperm(len(glist), generator=g)[: n_grouped // a.gsize]:
            mem = glist[gi]
            out.append(mem[torch.randperm(len(mem), generator=g)[: a.gsize]])
        out = torch.cat(out) if out else torch.empty(0, dtype=torch.long)
        rest = a.bs - len(out)
        if rest: out = torch.cat([out, torch.randint(len(rows), (rest,), generator=g)])
        return out
def drop_words(tokens, gen, drop=None):
    """--tdrop: each word token (between the start and end tokens) left out with chance a.tdrop, the
    rest closed up; at least one word kept. ``drop``: these tokens instead (--graycap)."""
    eot = tokens.argmax(-1)  # the end token has the largest id
    pos = torch.arange(tokens.shape[1])[None]
    word = (pos > 0) & (pos < eot[:, None])
    drop = word & ((torch.rand(tokens.shape, generator=gen) < a.tdrop) if drop is None else drop)
    none_left = (word & ~drop).sum(1) == 0
    drop[none_left] = False
    order = torch.argsort(torch.where(drop, tokens.shape[1] + pos, pos), dim=1, stable=True)
    out = tokens.gather(1, order)
    keep_len = (~drop & (pos <= eot[:, None])).sum(1)
    return out.masked_fill(pos >= keep_len[:, None], 0)
if a.ema:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(a.ema), use_buffers=True)
def colour_tokens(tokens):
    """--graycap: where the colour words are (a word of several tokens: each of its runs)."""
    hit = torch.zeros_like(tokens, dtype=torch.bool)
    for word in COLOUR_WORDS:
        n = len(word)
        win = tokens.unfold(1, n, 1)  # [B, L-n+1, n]
        at = (win == torch.tensor(word)).all(-1)
        for k in range(n):
            hit[:, k : k + at.shape[1]] |= at
    return hit
if a.graycap:
    _cids = tok([c for c in json.load(open(f'{W}/tasks/colour.json'))['classes'] if c not in a.graykeep.split(',')])
    COLOUR_WORDS = [r[1 : int(r.argmax())].tolist() for r in _cids]
g = torch.Generator().manual_seed(a.seed)
perm = torch.randperm(len(rows), generator=g); pos = 0
t0 = time.time(); model.train()
for step in range(a.steps):
    lr = a.lr * (step+1)/a.warmup if step < a.warmup else 0.5*a.lr*(1+math.cos(math.pi*(step-a.warmup)/(a.steps-a.warmup)))
    for gr in opt.param_groups: gr['lr'] = lr * gr['base'] / a.lr
    if step < a.single_steps:
        idx = SINGLE[torch.randint(len(SINGLE), (a.bs,), generator=g)]
    elif a.group == 'none':
        if pos + a.bs > len(perm):
            perm = torch.randperm(len(rows), generator=g); pos = 0; epoch_ += 1
            if a.multicap: T = TK[epoch_ % a.multicap]
        idx = perm[pos:pos+a.bs]; pos += a.bs
    else:
        idx = grouped_batch()
    def sweep_loss():
        tokens = drop_words(T[idx], g) if a.tdrop else T[idx]
        pick = None
        if a.graycap:  # grey images whose captions no longer name colours
            pick = torch.rand(a.bs, generator=g) < a.graycap
            tokens = drop_words(tokens, g, pick[:, None] & colour_tokens(tokens))
        if a.swapneg:
            K = a.swapneg
            rows_, mask_ = [], []
            for i in idx.tolist():
                gs = SG[i]
                if gs and a.swapall:  # every attribute word's swaps at once, up to K
                    r_ = [x for st, n_ in gs for x in range(st, st + n_)][:K]
                elif gs:
                    st, n_ = gs[int(torch.randint(len(gs), (1,), generator=g))]
                    r_ = list(range(st, st + min(n_, K)))
                else:
                    r_ = []
                mask_.append([True] * len(r_) + [False] * (K - len(r_)))
                rows_.extend(r_ + [0] * (K - len(r_)))
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bool(a.bf16)):
                imf = F.normalize(model.encode_image(augment(X[idx], g, pick)).float(), dim=-1)
                real_ = torch.tensor(mask_)  # the real copies only, as the trainer encodes them
                both = F.normalize(model.encode_text(torch.cat([tokens, SWT[torch.tensor(rows_)[real_.view(-1)]]])).float(), dim=-1)
            txf, ngf = both[:a.bs], both.new_zeros(a.bs, K, both.shape[1])
            ngf[real_] = both[a.bs:]
            sc = model.logit_scale.exp().clamp(max=100)
            li = sc * imf @ txf.T
            ln_ = (sc * torch.einsum('bd,bkd->bk', imf, ngf)).masked_fill(~torch.tensor(mask_), -1e4)
            tgt = torch.arange(a.bs)
            return 0.5 * (F.cross_entropy(torch.cat([li, ln_], 1), tgt) + F.cross_entropy(li.T, tgt))
        if a.neg:
            imf = F.normalize(model.encode_image(prep(X[idx])), dim=-1)
            both = F.normalize(model.encode_text(torch.cat([T[idx], TN[idx]])), dim=-1)
            txf, ngf = both[:a.bs], both[a.bs:]
            sc = model.logit_scale.exp().clamp(max=100)
            li = sc * imf @ txf.T
            ln_ = (sc * imf @ ngf.T).masked_fill(~HASNEG[idx][None, :], -1e4)
            tgt = torch.arange(a.bs)
            return 0.5 * (F.cross_entropy(torch.cat([li, ln_], 1), tgt) + F.cross_entropy(li.T, tgt))
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bool(a.bf16)):
            out = model(augment(X[idx], g, pick), tokens)
        return lossf(out.image_features, out.text_features, out.logit_scale, getattr(out, 'logit_bias', None))
    loss = train_step.minimise(sweep_loss).loss
    with torch.no_grad(): model.logit_scale.clamp_(0, math.log(100))
    if a.ema:
        ema.update_parameters(model)
    if step % 50 == 0 or step == a.steps-1:
        print(f'{a.name} step {step} loss {loss:.3f} scale {model.logit_scale.exp().item():.1f} {time.time()-t0:.0f}s', flush=True)
train_s = time.time()-t0
if a.ema:
    model = ema.module
model.eval()
trows, TX = load('test')
with torch.no_grad():
    img = torch.cat([model.encode_image(prep(TX[i:i+500])) for i in range(0, len(TX), 500)])
    img = F.normalize(img, dim=-1)
    res = {}
    for task in ['colour', 'shape', 'size', 'position', 'count']:
        tj = json.load(open(f'{W}/tasks/{task}.json'))
        cls = tj['classes']; col = tj['label_column']
        keep = [i for i, r in enumerate(trows) if r[col] in cls]
        lab = torch.tensor([cls.index(trows[i][col]) for i in keep])
        e = F.normalize(model.encode_text(tok([t.replace('{}', c) for t in tj['templates'] for c in cls])), dim=-1)
        w = F.normalize(e.view(len(tj['templates']), len(cls), -1).mean(0), dim=-1)
        res[task] = round(((img[keep] @ w.T).argmax(-1) == lab).float().mean().item()*100, 1)
        if task == 'shape':  # the same zero-shot classifier on the held-out colour-shape pairs
            shape_cls, shape_w = cls, w
            res.update(heldout_shape_scores(lambda x: [shape_cls[j] for j in (
                F.normalize(model.encode_image(x), dim=-1) @ shape_w.T).argmax(-1).tolist()]))
    # retrieval: first 1000 captions
    te = F.normalize(model.encode_text(tok([r['caption'] for r in trows[:1000]])), dim=-1)
    sims = te @ img[:1000].T
    rank = (sims > sims.diag().unsqueeze(1)).sum(1)
    res['t2i_r1'] = round((rank < 1).float().mean().item()*100, 1); res['t2i_r5'] = round((rank < 5).float().mean().item()*100, 1)
    from sklearn.linear_model import LogisticRegression
    trf = torch.cat([F.normalize(model.encode_image(prep(X[i:i+500])), dim=-1) for i in range(0, 4000, 500)])
    for task in ['shape', 'position', 'size']:
        col = task
        tr = [i for i in range(4000) if rows[i][col]]; te = [i for i, r in enumerate(trows) if r[col]]
        clf = LogisticRegression(max_iter=300, C=10).fit(trf[tr].numpy(), [rows[i][col] for i in tr])
        res['probe_' + task] = round(clf.score(img[te].numpy(), [trows[i][col] for i in te]) * 100, 1)
print(json.dumps({'name': a.name, **vars(a), 'train_s': round(train_s), **res}), flush=True)
open(a.out, 'a').write(json.dumps({'name': a.name, **vars(a), 'train_s': round(train_s), **res}) + '\n')
if a.save:
    clipforge.save(model, a.save)
