#!/bin/bash
# One-line changes of each rule of rollingq.py; each must make test_rollingq.py fail.
# bash tests/mutations.sh (a few minutes). Each change is made to a copy in a fresh temporary
# folder; the repository's files are never edited.
cd "$(dirname "$0")/.."
status=0
run() {
  name="$1"; old="$2"; new="$3"
  dir=$(mktemp -d)
  cp rollingq.py test_rollingq.py "$dir"
  if ! python - "$dir/rollingq.py" "$old" "$new" <<'PY'
import sys
path, old, new = sys.argv[1:]
s = open(path).read()
if s.count(old) != 1:
    sys.exit(1)
open(path, 'w').write(s.replace(old, new))
PY
  then echo "STALE (the line to change is not in rollingq.py once): $name"; status=1; rm -rf "$dir"; return; fi
  if (cd "$dir" && timeout 600 python -m pytest -q -x -p no:cacheprovider test_rollingq.py > log 2>&1); then
    echo "NOT CAUGHT: $name"; status=1
  else
    echo "caught: $name ($(grep -m1 FAILED "$dir/log"))"
  fi
  rm -rf "$dir"
}
run "float32 guard" "with torch.autocast(q.device.type, enabled=False):" "if True:"
run "composition order" "R_new.double() @ self.R[h].double()" "self.R[h].double() @ R_new.double()"
run "AIR sign" "return cos[..., 0] - cos[..., 1]" "return cos[..., 1] - cos[..., 0]"
run "unit mean keys" "q_bar, k_hat = query_mean.double(), F.normalize(key_means.double(), dim=1)" "q_bar, k_hat = query_mean.double(), key_means.double()"
run "epoch-mean keys" '"keys": sums["keys"] + batch["keys"]' '"keys": batch["keys"]'
run "AIR of the last batch, not the epoch" 'return {**batch, "n":' 'return {**batch, "last_cos": sums["last_cos"] + batch["last_cos"], "last_n": sums["last_n"] + batch["last_n"], "n":'
run "the rotated query is gathered" "batch_sums(rq[:, :, 0], key_means)" "batch_sums(q[:, :, 0].float(), key_means)"
run "roll limit" "int(self.rotation.rolls) < self.max_rolls" "int(self.rotation.rolls) <= self.max_rolls"
run "beta threshold" "abs(float(air[h])) <= self.beta" "abs(float(air[h])) < self.beta"
run "authors head no residual" "logits = self.head(y) " "logits = self.head(y + x[:, 0]) "
run "sigma lean" "alpha = (1 + torch.tanh(-sigma * air)) / 2" "alpha = (1 + torch.tanh(sigma * air)) / 2"
run "general anchor lean" "w = torch.softmax(-2.0 * sigma * (M - 1) / M * leads" "w = torch.softmax(2.0 * sigma * (M - 1) / M * leads"
run "gathered sums detached" "q, k_bar = query.detach().float(), key_means.detach().float()" "q, k_bar = query.float(), key_means.detach().float()"
run "R kept float32 on cast" "self.R = R.to(self.R.device)" "pass"
run "eval mode gathers nothing" "(self.training and torch.is_grad_enabled())" "(torch.is_grad_enabled())"
run "no_grad gathers nothing" "(self.training and torch.is_grad_enabled())" "(self.training)"
run "no RollingQ, no gathering" "self.gathering = False   " "self.gathering = True    "
run "collecting() gathers in eval" "self.gathering_in_eval or (" "("
run "the sums reset at a step" "rotation.sums = None                         # the next epoch" "pass                                         # the next epoch"
run "the sums are summed over ranks" "    torch.distributed.all_reduce(flat)" "    pass"
run "a load is checked and drops the sums" '    check_orthogonal(rotation.R, "load_state_dict")' "    return"
run "R must be a rotation" "if not error <= 1e-4:" "if False:"
run "NaN check" "if not all(bool(torch.isfinite(v).all()) for v in sums.values()):" "if False:"
run "only the CLS row rotated" "if q.dim() != 4 or tuple(q.shape[1:]) != (nh, 1, hs):" "if q.dim() != 4 or q.shape[1] != nh:"
run "no key bias" "nn.Linear(d_model, d_model, bias=False)" "nn.Linear(d_model, d_model)"
run "authors init" "        nn.init.xavier_normal_(module.weight)" "        pass"
run "separate projections, variance 1/C" "nn.init.xavier_normal_(module.weight)" "nn.init.xavier_normal_(module.weight, gain=math.sqrt(0.5))"
exit $status
