"""Why relation questions stay at chance on test-bed 2 (diagnostic for docs/results/testbed2-attempt8).

    python docs/results/testbed2-attempt8/diagnose_relation.py MODEL_DIR [--layer 3] [--eval EVAL_JSON]

For every relation question of the fixed 300-question set (`vistrim eval --data shapes --limit 300`),
asks it twice, once with "left" and once with "right", and prints:
  1. the cosine between the side word's hidden state in the two versions, per layer input;
  2. the attention mass of the side word (the scaffold's look-up word) in every head of --layer on
     the leftmost and on the rightmost shape's patches, per side word;
  3. with --eval, how the model's relation answers in that eval.json split: right, the opposite
     extreme shape, another shape in the scene, or a colour absent from it.
Analysis only: the copy it loads uses eager attention so that the weights can be read.
"""

import argparse
import collections
import json

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vistrim.data import shapes
from vistrim.data.labelled import labelled_test_items

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--layer", type=int, default=3)
p.add_argument("--eval", default=None)
args = p.parse_args()
model = LlavaForConditionalGeneration.from_pretrained(args.model, attn_implementation="eager").eval()
proc = AutoProcessor.from_pretrained(args.model)
items, _ = labelled_test_items("shapes", 300)
image_id = model.config.image_token_id
cosines, mass = collections.defaultdict(list), collections.defaultdict(list)
for item in items:
    if item.qtype != "relation":
        continue
    sh = item.scene.shapes
    order = sorted(range(len(sh)), key=lambda i: sh[i].center_x)
    cover = shapes.patch_coverage(item.scene).reshape(len(sh), -1) > 0
    states = {}
    for side in ("left", "right"):
        question = item.question.replace(" left ", f" {side} ").replace(" right ", f" {side} ")
        prompt = f"USER: <image>\n{question} ASSISTANT:"
        enc = proc(images=shapes.render(item.scene), text=prompt, return_tensors="pt")
        ids = enc["input_ids"][0]
        at = (ids == proc.tokenizer.convert_tokens_to_ids(side)).nonzero()[-1].item()
        with torch.no_grad():
            out = model(**enc, output_attentions=True, output_hidden_states=True)
        states[side] = [h[0, at] for h in out.hidden_states]
        image = (ids == image_id).nonzero().flatten()
        for head in range(out.attentions[args.layer].shape[1]):
            weights = out.attentions[args.layer][0, head, at][image].numpy()
            mass[(side, head, "leftmost")].append(weights[cover[order[0]]].sum())
            mass[(side, head, "rightmost")].append(weights[cover[order[-1]]].sum())
    for layer, (a, b) in enumerate(zip(states["left"], states["right"])):
        cosines[layer].append(torch.cosine_similarity(a, b, 0).item())
print("cosine(left, right) of the side word's state at the input of layer (0 = embedding):")
print("  " + "  ".join(f"{k}: {np.mean(v):.3f}" for k, v in cosines.items()))
print(f"attention mass of the side word, layer {args.layer}:")
for key in sorted(mass):
    print(f"  word {key[0]:5s} head {key[1]} on the {key[2]:9s} shape: {np.mean(mass[key]):.3f}")
if args.eval:
    row = json.load(open(args.eval))["rows"][0]
    split = collections.Counter()
    for item, answer, ok in zip(items, row["answers"], row["correct"]):
        if item.qtype != "relation":
            continue
        answer = (answer.split() or [""])[0]
        order = sorted(item.scene.shapes, key=lambda s: s.center_x)
        opposite = (order[-1] if " left " in item.question else order[0]).color
        present = {s.color for s in item.scene.shapes}
        if ok:
            split["right"] += 1
        elif answer == opposite:
            split["opposite extreme"] += 1
        else:
            split["other shape" if answer in present else "absent colour"] += 1
    print(f"relation answers of '{row['label']}' in {args.eval}: {dict(split)}")
