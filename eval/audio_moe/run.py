"""audio_moe harness: per-task codec-token loss, dynamic-capacity analytics (experts per token by task and layer,
null-expert rate, FFN FLOPs per token), generated wav + spectrogram PNG per prompt; with ``--generate N`` (default 4)
also speech mel-cepstral distortion against the held-out recordings and music style accuracy / Fréchet distance in the
feature space of a style classifier trained on the real training clips (file-name-prefix labels).

    python eval/audio_moe/run.py --model runs/audio_moe/3_joint/final --codec runs/audio_codec --out runs/eval_audio
    python eval/audio_moe/run.py --model audio_moe_small_e8k2 --tiny --codec random:dac --items 4   # smoke run
    python eval/audio_moe/run.py --model RUN_0/final RUN_1/final RUN_2/final --codec ...   # training seeds: mean ± std

Several ``--model`` folders (one per training seed: run the recipe with ``trainer.seed=S output_dir=RUN_S``) are
evaluated one by one into ``OUT/run_<i>`` and summarised in ``OUT/summary.json`` and a printed mean ± std table.
"""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, nargs="+",
                    help="save_pretrained folder(s) (several: seeds of one variant) or a registry name (fresh weights)")
    ap.add_argument("--tiny", action="store_true", help="with a registry name: its tiny variant")
    ap.add_argument("--codec", default="bundled",
                    help="bundled (the shipped mel-RVQ codec, default), an Encodec/DAC/Mimi/mel-RVQ save_pretrained "
                         "folder, or random:dac")
    ap.add_argument("--speech", default="asterisk")
    ap.add_argument("--music", default="sonic_pi")
    ap.add_argument("--items", type=int, default=16, help="held-out clips per task")
    ap.add_argument("--max-frames", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--generate", type=int, default=4,
                    help="held-out items per task to generate from for MCD / style metrics (0: skip)")
    ap.add_argument("--out", default="runs/eval_audio_moe")
    args = ap.parse_args(argv)

    from pathlib import Path

    import moezoo
    from moezoo.metrics.seeds import format_mean_std, summarize_runs
    from moezoo.models.audio_moe import MoezooAudioMoeForCausalLM
    from moezoo.models.audio_moe.data_audio import split_items
    from moezoo.models.audio_moe.harness import run_harness
    from moezoo.models.audio_moe.recipe import load_codec, load_items

    codec = load_codec({"random": "dac"} if args.codec == "random:dac" else {"bundled": True} if args.codec == "bundled"
                       else {"path": args.codec})
    items, music_train = [], []
    for source in (args.speech, args.music):
        train, held_out = split_items(load_items(source), held_out=0.1)
        items += held_out[: args.items]
        music_train += [it for it in train if it.task == "music" and it.label]
    classifier = None
    if args.generate > 0 and len({it.label for it in music_train}) >= 2:
        from moezoo.models.audio_moe.audio_metrics import StyleClassifier
        from moezoo.models.audio_moe.data_audio import load_audio

        classifier = StyleClassifier(codec.sample_rate).fit(
            [load_audio(it.path, codec.sample_rate)[0] for it in music_train], [it.label for it in music_train])
    reports = []
    for i, name in enumerate(args.model):
        if Path(name).is_dir():
            model = MoezooAudioMoeForCausalLM.from_pretrained(name)
        else:
            model = moezoo.create_model(name, tiny=args.tiny, vocab_size=256, num_codebooks=codec.num_codebooks,
                                        codebook_size=codec.codebook_size,
                                        delay_pattern=list(range(codec.num_codebooks)))
        out = args.out if len(args.model) == 1 else Path(args.out) / f"run_{i}"
        reports.append(run_harness(model, codec, items, out, max_frames=args.max_frames,
                                   max_new_tokens=args.max_new_tokens, style_classifier=classifier,
                                   generate_per_task=args.generate))
    print(json.dumps({t: {k: v for k, v in r.items() if k != "layers"} for t, r in reports[0]["tasks"].items()},
                     indent=1))
    for key in ("speech_mcd", "music_style"):
        if key in reports[0]:
            print(key, json.dumps(reports[0][key], indent=1))
    if len(reports) > 1:
        summary = summarize_runs([r["tasks"] for r in reports])
        Path(args.out).mkdir(parents=True, exist_ok=True)
        gen = summarize_runs([{k: r[k] for k in ("speech_mcd", "music_style") if k in r} for r in reports])
        (Path(args.out) / "summary.json").write_text(json.dumps({"models": args.model, "tasks": summary, **gen},
                                                                indent=1))
        print("| task | runs | codec-token loss | real experts / token (mean over layers) |")
        print("|---|---|---|---|")
        for task, r in summary.items():
            per_layer = [v["real_experts_per_token"]["mean"] for v in r.get("layers", {}).values()]
            exp = f"{sum(per_layer) / len(per_layer):.2f}" if per_layer else "-"
            print(f"| {task} | {len(reports)} | {format_mean_std(r['codec_token_loss'])} | {exp} |")
        if "speech_mcd" in gen:
            print(f"speech MCD (dB): {format_mean_std(gen['speech_mcd']['mcd_db'])}")
        if "music_style" in gen and "frechet" in gen["music_style"]:
            m = gen["music_style"]
            print(f"music style accuracy: {format_mean_std(m['style_accuracy'])}; Fréchet distance: "
                  f"{format_mean_std(m['frechet'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
