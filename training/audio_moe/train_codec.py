"""Train the small codecs on real offline speech + music for the same CPU time, keep the better one (held-out log-mel
distance), save it with save_pretrained and write codec_comparison.json (mel distance, SI-SNR before / after).

    python training/audio_moe/train_codec.py --minutes 5 --out runs/audio_codec
"""
import argparse
import json

from moezoo.models.audio_moe.codec_training import compare_and_save
from moezoo.models.audio_moe.data_audio import asterisk_speech, sonic_pi_music, split_items

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="CPU minutes per codec")
    ap.add_argument("--kinds", nargs="+", default=["dac", "encodec"])
    ap.add_argument("--out", default="runs/audio_codec")
    ap.add_argument("--held-out", type=int, default=12, help="held-out clips per task")
    args = ap.parse_args()
    tr_s, te_s = split_items(asterisk_speech(), 0.1)
    tr_m, te_m = split_items(sonic_pi_music(), 0.15)
    summary = compare_and_save(tr_s + tr_m, te_s[: args.held_out] + te_m[: args.held_out], args.out,
                               minutes=args.minutes, kinds=args.kinds, log=lambda m: print(m, flush=True))
    print(json.dumps(summary, indent=1))
