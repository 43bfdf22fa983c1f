PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: test demo demo-student-gt demo-student demo-trained-student demo-teachers demo-student-init install clean

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q -e '.[test,export,s3]'
	touch $(VENV_STAMP)

install: $(VENV_STAMP)

test: $(VENV_STAMP)
	$(PY) -m pytest

ODKD := .venv/bin/odkd
# The demo's two datasets, regenerated bit-identically from their seeds on every run: the teachers'
# (check-teachers verifies it against the released files) and the student's, other images where labels
# are scarce: 200 labelled images and 2,000 unlabelled ones with a person detector's boxes.
TEACHER_DATA := --train-images 1000 --val-images 100 --difficulty easy --seed 0
DEMO_DATA := --train-images 200 --val-images 100 --test-images 200 --unlabeled-images 2000 --difficulty easy --seed 1
# odkd synth refuses a folder that already holds a dataset, so every synth line below passes --force: it
# clears what synth wrote there and writes it again. Simpler than skipping a dataset whose parameters match
# (synth records them only in part) and as correct: the same options give the same bytes, so the stores and
# runs built on them stay valid, and a folder left half-written by an interrupted run is made whole.
# re-running a step resumes an interrupted run and returns at once from a finished one
resume_if = $$(test -f $(1)/last.pth && echo --resume)

# The demo, step by step; each line is a command a user can run by hand. The teachers are the
# released files in zoo/ (make demo-teachers rebuilds them).
demo: $(VENV_STAMP)
	$(ODKD) synth --force data/demo-teachers $(TEACHER_DATA)
	$(ODKD) synth --force data/demo $(DEMO_DATA)
	$(ODKD) check-teachers
	$(ODKD) cache-teachers --workers 2
	$(ODKD) cache-teachers --split unlabeled --workers 2
	$(ODKD) cache info cache/demo_unlabeled.zarr
	$(MAKE) --no-print-directory -j2 demo-student-gt demo-student
	$(ODKD) report --split test

# The two students train side by side at one torch thread each: faster on 2 cores than one after the
# other at two threads, and a one-thread CPU run gives the same weights run after run. The GT-only
# student logs to a file, so that the ODKD student's progress bar stays readable, and prints its
# summary when it ends. Both train demo.toml's epochs at the same steps: the ODKD student's unlabelled
# people come on top of each step's labelled batch ([student] unlabeled_ratio).
demo-student-gt:
	mkdir -p runs/demo
	OMP_NUM_THREADS=1 TQDM_DISABLE=1 $(ODKD) train-student --variant gt $(call resume_if,runs/demo/student_gt) \
		> runs/demo/student_gt.log 2>&1 || { tail -n 20 runs/demo/student_gt.log; exit 1; }
	@printf '\nGT-only student (log: runs/demo/student_gt.log):\n' && sed -n '/^{/,$$p' runs/demo/student_gt.log

demo-student:
	OMP_NUM_THREADS=1 $(ODKD) train-student $(call resume_if,runs/demo/student)

# A student that is already trained (PT's own weights) with pipeline/demo_trained_student.toml's
# recipe, beside GT fine-tuning for the same steps, from make demo's data and stores: a few minutes.
TRAINED := --config pipeline/demo_trained_student.toml
demo-trained-student: $(VENV_STAMP)
	mkdir -p runs/trained
	OMP_NUM_THREADS=1 TQDM_DISABLE=1 $(ODKD) train-student $(TRAINED) --variant gt > runs/trained/student_gt.log 2>&1 & \
	OMP_NUM_THREADS=1 TQDM_DISABLE=1 $(ODKD) train-student $(TRAINED) > runs/trained/student.log 2>&1; \
	status=$$?; wait $$! || { tail -n 20 runs/trained/student_gt.log; exit 1; }; \
	[ $$status -eq 0 ] || { tail -n 20 runs/trained/student.log; exit 1; }
	$(ODKD) report $(TRAINED) --split test

# Train the two demo teachers from scratch with pipeline/demo.toml's recipe and release them into
# zoo/ as float16 weights; paste the fingerprints it prints into pipeline/demo.toml. The released
# files were trained on one H200 (make demo-teachers DEVICE=cuda); a GPU run does not reproduce bit
# for bit, so a rebuild gives new fingerprints and about the same AP.
DEVICE ?=
TRAIN_ON := $(if $(DEVICE),--device $(DEVICE))
demo-teachers: $(VENV_STAMP)
	$(ODKD) synth --force data/demo-teachers $(TEACHER_DATA)
	$(ODKD) train-teacher --role primary $(TRAIN_ON) $(call resume_if,runs/demo/teacher_primary)
	$(ODKD) train-teacher --role senior $(TRAIN_ON) $(call resume_if,runs/demo/teacher_senior)
	$(ODKD) release-teacher --role primary
	$(ODKD) release-teacher --role senior

# Train the students' init (pipeline/demo.toml's [teachers.init]) on the teachers' data and release it into
# zoo/; paste the fingerprint it prints into [teachers.init]. The released file was trained on 2 CPU cores
# at one torch thread, which reproduces bit for bit on the same machine only.
demo-student-init: $(VENV_STAMP)
	$(ODKD) synth --force data/demo-teachers $(TEACHER_DATA)
	OMP_NUM_THREADS=1 $(ODKD) train-teacher --role init $(TRAIN_ON) $(call resume_if,runs/demo/teacher_init)
	$(ODKD) release-teacher --role init

clean:
	rm -rf .venv runs data cache/*.zarr
