#!/bin/bash
# One-line changes of each rule of rollingq.py; each must make test_rollingq.py fail.
# bash tests/mutations.sh (a few minutes). Each change is made to a copy in a fresh temporary
# folder; the repository's files are never edited.
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
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
run "no RollingQ, no gathering" "self.gathering, self.gathering_in_eval = False, False" "self.gathering, self.gathering_in_eval = True, False"
run "collecting() gathers in eval" "self.gathering_in_eval or (" "("
run "the sums reset at a step" "rotation.sums = None                         # the next epoch" "pass                                         # the next epoch"
run "the sums are summed over ranks" "    all_reduced(flat)" "    pass"
run "a load is checked and drops the sums" '    check_orthogonal(rotation.R, "load_state_dict")' "    return"
run "R must be a rotation" "if not error <= 1e-4:" "if False:"
run "NaN check" "if not all(bool(torch.isfinite(v).all()) for v in sums.values()):" "if False:"
run "only the CLS row rotated" "if q.dim() != 4 or tuple(q.shape[1:]) != (nh, 1, hs):" "if q.dim() != 4 or q.shape[1] != nh:"
run "no key bias" "nn.Linear(d_model, d_model, bias=False)" "nn.Linear(d_model, d_model)"
run "authors init" "        nn.init.xavier_normal_(module.weight)" "        pass"
run "separate projections, variance 1/C" "nn.init.xavier_normal_(module.weight)" "nn.init.xavier_normal_(module.weight, gain=math.sqrt(0.5))"
run "an R changed outside a roll is checked" "if torch.compiler.is_compiling() or R.is_meta or R.is_inference():" "if True:"
run "nothing written to R: the fast path only then" "if trusted is not None and trusted[0] == id(R) and trusted[1] == R._version:" "if trusted is not None:"
run "a changed R's values are compared" "if not torch.equal(R, trusted[2].to(R)):" "if False:"
run "an R never set after to_empty is refused" "    if trusted is None:" "    if False:"
run "reset_parameters sets R = I" "self.R.copy_(torch.eye(self.R.shape[-1]).expand_as(self.R))" "pass"
run "reset_parameters sets no roll" "        self.rolls.zero_()" "        pass"
run "paused leaves a forward out" "        self.rotation.gathering = False" "        pass"
run "a reflection is refused" "if not bool((torch.linalg.det(R64) > 0).all()):" "if False:"
run "a negative roll count is refused" "if int(rotation.rolls) < 0:" "if False:"
run "max_rolls is whole" "(isinstance(max_rolls, int) and not isinstance(max_rolls, bool) and max_rolls >= 0)" "(max_rolls >= 0)"
run "a non-tensor is a TypeError" "if not isinstance(x, torch.Tensor):" "if False:"
run "one modality is out of scope" "    if key_means.shape[2] < 2:" "    if False:"
run "a failed all-reduce names RollingQ" "    except RuntimeError as e:" "    except ValueError as e:"
run "a load checks R only when it loads R" 'if prefix + "R" in state_dict:' "if True:"
run "the near-parallel branch only for parallel vectors" "if sin_theta <= 1e-12:" "if sin_theta <= 1e-3:"
run "the sums move with the module" "self.sums = {k: v.to(self.R.device) for k, v in self.sums.items()}" "pass"
run "R is a rotation to within 1e-4" "if not error <= 1e-4:" "if not error <= 1e-2:"
run "the general anchor's lean factor" "w = torch.softmax(-2.0 * sigma * (M - 1) / M * leads" "w = torch.softmax(-2.0 * sigma * leads"
run "AIR for M > 2 is the largest lead" "return modality_leads(cos).max(-1).values" "return modality_leads(cos).abs().max(-1).values"
run "one roll by default" "max_rolls=1):" "max_rolls=None):"
run "a step leans by the modalities in order" 'K_bar = sums["keys"] / sums["n"]' 'K_bar = sums["keys"].flip(-2) / sums["n"]'
run "fusion dropout on the weights" "(self.attn_drop(a) @ v)" "(a @ self.attn_drop(v))"
run "key_gap over every head" "sim = K @ K.transpose(-1, -2)" "sim = (K @ K.transpose(-1, -2))[:1]"
run "key_gap over every pair" "pairs = torch.triu_indices(sim.shape[-1], sim.shape[-1], offset=1)" "pairs = torch.triu_indices(sim.shape[-1], sim.shape[-1], offset=1)[:, :1]"
run "rolls compose in float64" "self.R[h] = (R_new.double() @ self.R[h].double()).to(self.R.dtype)" "self.R[h] = R_new.to(self.R.dtype) @ self.R[h]"
run "the last forward's query and AIR, not the first's" 'return {**batch, "n":' 'return {**sums, "n":'
run "the authors' statistics keep the last training batch's AIR" "self.rotation.sums.update({k: trained[k] for k in (\"last_n\", \"last_query\", \"last_cos\")})" "pass"
exit $status
