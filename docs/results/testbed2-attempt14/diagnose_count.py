"""How a test-bed 2 counts (diagnostic for docs/results/testbed2-attempt14).

    python docs/results/testbed2-attempt14/diagnose_count.py MODEL_DIR 3 [--layer 3] [--scenes 60]

For every count question on the training script's test scenes of that seed (``shapes.eval_items``:
photos and random stream never used in training) prints, for the counted word ("triangles") in
heads 0-1 of ``--layer`` (the scaffold's look-up heads, averaged):
  - the first token's (the sink's) share of the attention, against 1 / (n + 1), what a count's
    look-up target gives it with ``--count-look centre`` or ``mass``;
  - every counted object's attention mass over the sink's (1.0 is one object's exact share);
  - the object sizes in patches and the model's answer.
Then the mean and spread of the sink's share per true count. Analysis only: the copy it loads uses
eager attention so that the weights can be read.
"""

import argparse
import collections

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vistrim.data import shapes

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("seed", type=int)
p.add_argument("--layer", type=int, default=3)
p.add_argument("--scenes", type=int, default=60)
args = p.parse_args()
torch.set_num_threads(2)
model = LlavaForConditionalGeneration.from_pretrained(args.model, attn_implementation="eager").eval()
proc = AutoProcessor.from_pretrained(args.model)
items = [it for it in shapes.eval_items(args.scenes, args.seed) if it.qtype == "count"]
sinks, wrong = collections.defaultdict(list), 0
for it in items:
    prompt = f"USER: <image>\n{it.question} ASSISTANT:"
    enc = proc(images=shapes.render(it.scene), text=prompt, return_tensors="pt")
    ids = enc["input_ids"][0]
    at = (ids == proc.tokenizer.convert_tokens_to_ids(it.question.split()[2])).nonzero()[-1].item()
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    weights = out.attentions[args.layer][0, :2, at].mean(0)
    sink = weights[0].item()
    image = (ids == model.config.image_token_id).nonzero().flatten()
    cover = shapes.patch_coverage(it.scene).reshape(len(it.scene.shapes), -1) > 0
    per_object = [float(weights[image][torch.from_numpy(cover[i])].sum()) / sink for i in it.objects]
    sizes = shapes.shape_sizes(it.scene)
    said = proc.tokenizer.decode(out.logits[0, -1].argmax().item()).strip()
    n = int(it.answer)
    sinks[n].append(sink)
    wrong += said != it.answer
    print(
        f"n={n} sink={sink:.3f} (1/(n+1) = {1 / (n + 1):.3f}) objects/sink="
        f"{[round(x, 2) for x in per_object]} sizes={[round(sizes[i], 1) for i in it.objects]} "
        f"answer={said}{'  WRONG' if said != it.answer else ''}"
    )
print(f"{len(items)} count questions, {wrong} wrong")
for n in sorted(sinks):
    spread = f"sd {np.std(sinks[n]):.3f} ({len(sinks[n])} questions)"
    print(f"n={n}: sink share mean {np.mean(sinks[n]):.3f}, {spread}")
