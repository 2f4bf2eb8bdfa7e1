# facepipe — the two commands a newcomer needs are `make lab` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV      ?= .venv
DEPLOY_VENV ?= .venv-deploy
PY        := $(VENV)/bin/python
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
SCENARIOS ?= broker default faults

# Debian packages the controller needs: a broker for the unit tests, the lab's host builder and
# network tools, and a browser to check the contact sheet.
APT_PACKAGES := mosquitto mosquitto-clients debootstrap debian-archive-keyring systemd-container \
	iproute2 nftables openssh-client rsync curl ca-certificates python3-venv chromium \
	chromium-driver

.PHONY: help deps venv deploy-tools lock lint unit molecule test test-arm64 lab lab-down bench clean

help:
	@echo "make lab       build the local lab (edge + cloud hosts, S3) and run facepipe end to end"
	@echo "make lab-down  stop and remove the lab"
	@echo "make test      all tests: lint, unit/integration (services), molecule scenarios"
	@echo "make deploy-tools  the light controller environment for a real site (.venv-deploy/)"
	@echo "make lint | unit | molecule | bench | deps | venv | lock"
	@echo "make test-arm64  opt-in: an arm64 edge's packages, wheels and detector under qemu-user (~10 min)"

deps:  ## Debian packages (needs root; installs only what is missing)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): requirements/controller.txt services/pyproject.toml services/constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/controller.txt
	$(BIN)/pip install -q --no-deps -e services
	touch $@

venv: $(STAMP)

# The light controller for real sites: ansible-core, cryptography, build and community.crypto
# (~70 MB), the versions of requirements/controller.txt. make lint deploys the PKI with it.
$(DEPLOY_VENV)/.installed: requirements/deploy.in requirements/controller.txt scripts/deploy-collections
	python3 -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q --upgrade pip
	$(DEPLOY_VENV)/bin/pip install -q -c requirements/controller.txt -r requirements/deploy.in
	$(DEPLOY_VENV)/bin/python scripts/deploy-collections $(DEPLOY_VENV)
	touch $@

deploy-tools: $(DEPLOY_VENV)/.installed

lock: $(STAMP)  ## re-pin requirements/controller.txt from requirements/controller.in
	cd requirements && ../$(BIN)/pip install -q -r controller.in
	( echo "# Generated from requirements/controller.in by 'make lock'; do not edit by hand."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^-e ' ) > requirements/controller.txt

PY_SCRIPTS := scripts/lab-up scripts/moto-server scripts/deploy-collections

# promtool checks files/prometheus. It comes out of Debian's prometheus package without installing
# it (installing would start a Prometheus server on this machine).
PROMTOOL := $(BIN)/promtool
$(PROMTOOL): | $(STAMP)
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; cd "$$tmp"; \
	get() { apt-get download -qq -o APT::Sandbox::User=root prometheus; }; \
	get || { apt-get update -qq && get; }; \
	dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > "$(CURDIR)/$@.part"
	chmod 0755 $@.part && mv $@.part $@

lint: $(STAMP) $(PROMTOOL) $(DEPLOY_VENV)/.installed
	cd services && ../$(BIN)/ruff check . && ../$(BIN)/ruff format --check .
	cd services && ../$(BIN)/mypy --ignore-missing-imports src
	$(BIN)/mypy --ignore-missing-imports molecule/_lab/lab.py scripts/check-arm64.py
	$(BIN)/ruff check . $(PY_SCRIPTS) && $(BIN)/ruff format --check . $(PY_SCRIPTS)
	$(PY) scripts/check-argument-specs.py
	$(BIN)/ansible-playbook -i localhost, scripts/check-bad-variables.yml
	$(PY) scripts/check-site-facts.py
	$(PY) scripts/deploy-collections --check
	$(DEPLOY_VENV)/bin/python scripts/check-pki-renewal.py  # the CA and certificates, by the light controller
	$(DEPLOY_VENV)/bin/ansible-playbook -i inventory/example playbooks/site.yml --syntax-check
	cd files/prometheus && $(CURDIR)/$(PROMTOOL) check rules facepipe-rules.yml \
		&& $(CURDIR)/$(PROMTOOL) test rules facepipe-rules.test.yml
	PATH="$(CURDIR)/$(BIN):$$PATH" ansible-lint --profile production

unit: deps $(STAMP)
	cd services && ../$(BIN)/pytest -q

molecule: deps $(STAMP)
	$(PY) molecule/_lab/lab.py images
	@for s in $(SCENARIOS); do \
		echo "=== molecule test -s $$s"; \
		PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/molecule test -s $$s || exit 1; \
	done

test: lint unit molecule

lab: deps $(STAMP) $(DEPLOY_VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/lab-up

lab-down:
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/lab-down

# Opt-in (about 10 minutes, not part of `make test`): an arm64 edge's packages, wheels and detector in a
# Debian arm64 chroot under qemu-user-static (scripts/check-arm64.py says why not a booted lab host).
test-arm64: deps $(STAMP)
	$(PY) scripts/check-arm64.py

bench: deps $(STAMP)
	cd services && ../$(PY) bench/bench_detector.py && ../$(PY) bench/bench_writer.py && ../$(PY) bench/bench_outbox.py

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) services/build services/dist .lab
