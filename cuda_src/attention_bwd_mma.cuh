// (tensor-core backward: see below)
#pragma once
