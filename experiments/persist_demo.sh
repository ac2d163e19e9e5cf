# Compress a 4,056-token KJV passage with three planted facts once, save it, ask three questions of the
# saved file, and compare with recompressing for each question (kvcompress on PATH, bench extra installed).
# Usage: bash experiments/persist_demo.sh [FOLDER]
set -e
cd "${1:-.}"  # a working folder (default: here)
python - <<'PY'
from kvcompress.bench.texts import load_text
from kvcompress.models import load_model
_, tok = load_model()
ids = tok(load_text("kjv").body[:40000], add_special_tokens=False)["input_ids"][2000:6000]
s = tok.decode(ids).split(". ")
s.insert(len(s) // 4, "The lighthouse keeper's secret number is 4721")
s.insert(len(s) // 2, "The ferry to Elm leaves at seven in the morning")
s.insert(3 * len(s) // 4, "Ada Brook kept the harbour records")
open("doc.txt", "w").write(". ".join(s))
PY
M="kivi:bits=4"
Q1="What is the lighthouse keeper's secret number?"; Q2="When does the ferry to Elm leave?"; Q3="Who kept the harbour records?"
echo "== compress"; /usr/bin/time -f "%e s wall, %M KB peak RSS" kvcompress compress --context-file doc.txt --method "$M" --out doc.kvc
ls -l doc.kvc
echo "== ask three questions of the saved file"; /usr/bin/time -f "%e s wall, %M KB peak RSS" kvcompress ask doc.kvc --question "$Q1" --question "$Q2" --question "$Q3" --max-new-tokens 24
echo "== recompress for each question (generate x3)"
start=$(date +%s.%N)
for q in "$Q1" "$Q2" "$Q3"; do kvcompress generate --context-file doc.txt --method "$M" --question "$q" --max-new-tokens 24; done
end=$(date +%s.%N); echo "generate x3: $(echo "$end - $start" | bc) s wall"
