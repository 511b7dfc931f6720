#!/bin/bash
# One-line changes of each rule of rollingq.py; each must make test_rollingq.py fail.
# bash tests/mutations.sh (a few minutes; rollingq.py is restored at the end)
cd "$(dirname "$0")/.."
cp rollingq.py /tmp/rollingq.orig
trap "cp /tmp/rollingq.orig rollingq.py" EXIT
status=0
run() {
  name="$1"; old="$2"; new="$3"
  if ! python - "$old" "$new" <<'PY'
import sys
s = open('rollingq.py').read(); old, new = sys.argv[1], sys.argv[2]
if s.count(old) != 1:
    sys.exit(1)
open('rollingq.py', 'w').write(s.replace(old, new))
PY
  then echo "STALE (the line to change is not in rollingq.py once): $name"; status=1; return; fi
  if timeout 600 python -m pytest -q -x -p no:cacheprovider test_rollingq.py > /tmp/mut.log 2>&1; then echo "NOT CAUGHT: $name"; status=1; else echo "caught: $name ($(grep -m1 FAILED /tmp/mut.log))"; fi
  cp /tmp/rollingq.orig rollingq.py
}
run "float32 guard" "with torch.autocast(q.device.type, enabled=False):" "if True:"
run "composition order" "R_new.double() @ self.R[h].double()" "self.R[h].double() @ R_new.double()"
run "AIR sign" "return cos[..., 0] - cos[..., 1]" "return cos[..., 1] - cos[..., 0]"
run "unit mean keys" "q_bar, k_hat = query_mean.double(), F.normalize(key_means.double(), dim=1)" "q_bar, k_hat = query_mean.double(), key_means.double()"
run "epoch-mean keys" "K_bar = key_sum / n " "K_bar = k_bar.mean(0) "
run "roll limit" "int(query_rotation(model).rolls) < self.max_rolls" "int(query_rotation(model).rolls) <= self.max_rolls"
run "beta threshold" "abs(float(air[h])) <= self.beta" "abs(float(air[h])) < self.beta"
run "authors head no residual" "logits = self.head(y) " "logits = self.head(y + x[:, 0]) "
run "sigma lean" "alpha = (1 + torch.tanh(-sigma * air)) / 2" "alpha = (1 + torch.tanh(sigma * air)) / 2"
run "general anchor lean" "w = torch.softmax(-2.0 * sigma * (M - 1) / M * leads" "w = torch.softmax(2.0 * sigma * (M - 1) / M * leads"
run "AIR of the last batch, not the epoch" "cos = cos_sum / n_last " "cos = modality_cosines(q_bar, K_bar) "
run "detach in observe" "q, k_bar = query.detach().float(), key_means.detach().float()" "q, k_bar = query.float(), key_means.detach().float()"
run "R kept float32 on cast" "self.R = R.to(self.R.device)" "pass"
run "rotated query check" "        bool(torch.isin(q[..., 0]" "        True or bool(torch.isin(q[..., 0]"
run "stale rows forgotten at a roll" "self.returned.fill_(math.nan) " "self.returned.clone() "
run "NaN check" "    if nonfinite:" "    if False:"
run "only the CLS row rotated" "if q.dim() != 4 or tuple(q.shape[1:]) != (nh, 1, hs):" "if q.dim() != 4 or q.shape[1] != nh:"
run "no key bias" "nn.Linear(d_model, d_model, bias=False)" "nn.Linear(d_model, d_model)"
run "authors init" "        nn.init.xavier_normal_(module.weight)" "        pass"
run "separate projections, variance 1/C" "nn.init.xavier_normal_(module.weight)" "nn.init.xavier_normal_(module.weight, gain=math.sqrt(0.5))"
cp /tmp/rollingq.orig rollingq.py
exit $status
