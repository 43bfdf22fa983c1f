PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: test demo install clean

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q -e '.[test,export]'
	touch $(VENV_STAMP)

install: $(VENV_STAMP)

test: $(VENV_STAMP)
	$(PY) -m pytest

ODKD := .venv/bin/odkd
DEMO_VAL := data/demo/annotations/person_keypoints_val.json

# The demo pipeline, step by step; each line is a command a user can run by hand.
# Re-running resumes interrupted teacher runs and skips finished ones.
demo: $(VENV_STAMP)
	$(ODKD) synth data/demo --train-images 300 --val-images 60 --seed 0
	$(ODKD) evaluate --ann $(DEMO_VAL) --gt-as-results
	$(ODKD) browse --split train --augment --out runs/demo/browse -n 16
	$(ODKD) train-teacher --role primary $$(test -f runs/demo/teacher_primary/last.pth && echo --resume)
	$(ODKD) train-teacher --role senior $$(test -f runs/demo/teacher_senior/last.pth && echo --resume)
	$(ODKD) evaluate --checkpoint runs/demo/teacher_primary/best.pth --stats-json runs/demo/teacher_primary/val_stats.json
	$(ODKD) evaluate --checkpoint runs/demo/teacher_senior/best.pth --stats-json runs/demo/teacher_senior/val_stats.json
	$(ODKD) cache-teachers --workers 2
	$(ODKD) cache info cache/demo.zarr
	$(ODKD) cache verify cache/demo.zarr --config pipeline/demo.toml

clean:
	rm -rf .venv runs data
