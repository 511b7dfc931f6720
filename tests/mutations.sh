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
run "AIR sign" "return cosines[..., 0] - cosines[..., 1]" "return cosines[..., 1] - cosines[..., 0]"
run "unit mean keys" "t = alpha * k_hat[0] + (1 - alpha) * k_hat[1]" "t = alpha * K_bar[0] + (1 - alpha) * K_bar[1]"
run "epoch-mean keys" "K_bar = key_sum / n " "K_bar = k_bar.mean(0) "
run "roll limit" "int(query_rotation(model).rolls) < self.max_rolls" "int(query_rotation(model).rolls) <= self.max_rolls"
run "beta threshold" "abs(float(air[h])) > self.beta" "abs(float(air[h])) >= self.beta"
run "authors head no residual" "logits = self.head(y) " "logits = self.head(y + x[:, 0]) "
run "sigma lean" "alpha = (1 + torch.tanh(-sigma * air)) / 2" "alpha = (1 + torch.tanh(sigma * air)) / 2"
run "general anchor lean" "w = torch.softmax(-2.0 * sigma * cosines.to(k_hat.dtype), dim=0)" "w = torch.softmax(2.0 * sigma * cosines.to(k_hat.dtype), dim=0)"
run "detach in observe" "self.last = (query.detach().float(), k_bar)" "self.last = (query.float(), k_bar)"
run "R kept float32 on cast" "self.R = R.to(self.R.device)" "pass"
run "rotated query check" "unrotated = not any(" "unrotated = 0 * any("
run "NaN check" "        if nonfinite:" "        if False:"
run "only the CLS row rotated" "if q.dim() != 4 or tuple(q.shape[1:]) != (nh, 1, hs):" "if q.dim() != 4 or q.shape[1] != nh:"
run "no key bias" "return F.linear(x, self.qkv.weight, self.qkv.bias * self.bias_keep)" "return self.qkv(x)"
run "authors init" "        nn.init.xavier_normal_(module.weight)" "        pass"
cp /tmp/rollingq.orig rollingq.py
exit $status
